"""Evaluation metrics (docs/method.md §7): accuracy and macro mAP over softmax scores; CMU-MOSI's Acc-2, weighted F1,
Pearson correlation and Acc-7.

Hand-written on torch tensors (no host copy, no run-time dependency); tests/test_metrics_sklearn.py checks every
one against scikit-learn / SciPy on random inputs, ties and empty classes included."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose argmax (the first of tied maxima) is the label; NaN for an empty set."""
    return float((logits.argmax(dim=1) == labels).double().mean()) if len(labels) else float("nan")


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AP = Σ_n (R_n − R_{n−1}) P_n over the distinct score thresholds (tied scores form one threshold).

    NaN when there is no positive sample.
    """
    npos = int(positive.sum())
    if npos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], positive[order].double()
    tp, fp = y.cumsum(0), (1 - y).cumsum(0)
    last_of_tie = torch.ones_like(s, dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision, recall = tp / (tp + fp), tp / npos
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_step * precision).sum())


def macro_map(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes (with at least one positive) of one-vs-rest AP of the softmax scores."""
    probs = torch.softmax(logits.double(), dim=1)
    aps = [average_precision(probs[:, c], labels == c) for c in range(probs.shape[1])]
    aps = [a for a in aps if a == a]
    return sum(aps) / len(aps) if aps else float("nan")


# --- CMU-MOSI (sentiment) -------------------------------------------------------------------------------------
def binary_scores(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(accuracy, support-weighted F1) of boolean predictions against boolean targets.

    The weighted F1 averages the F1 of each class (positive and negative, each treated as "the" class) with
    weights equal to the class's share of the targets; a class with no prediction and no target scores 0.
    NaN for an empty set.
    """
    pred, target = pred.bool().flatten(), target.bool().flatten()
    n = len(target)
    if n == 0:
        return float("nan"), float("nan")
    acc = float((pred == target).double().mean())
    f1 = 0.0
    for cls in (True, False):
        p, t = pred == cls, target == cls
        tp = float((p & t).sum())
        denominator = float(p.sum()) + float(t.sum())
        f1_cls = 2 * tp / denominator if denominator else 0.0
        f1 += f1_cls * float(t.sum()) / n
    return acc, f1


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation coefficient (NaN when either side is constant or there are < 2 values)."""
    x, y = x.double().flatten(), y.double().flatten()
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def seven_class_accuracy(pred: torch.Tensor, score: torch.Tensor) -> float:
    """Acc-7: predictions and scores clipped to [-3, 3] and rounded to the nearest integer (halves to even,
    as numpy rounds) agree."""
    if len(score) == 0:
        return float("nan")
    a = torch.round(pred.double().clamp(-3, 3))
    b = torch.round(score.double().clamp(-3, 3))
    return float((a == b).double().mean())
