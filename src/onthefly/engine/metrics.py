"""Classification metrics (METHOD.md §7): accuracy and macro mAP over softmax scores."""
from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")


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
