"""The hand-written metrics (onthefly.engine.metrics, used by onthefly.tasks) against scikit-learn and SciPy on
random inputs: ties, classes without positives, empty subsets and near-constant predictions included.

The metrics stay hand-written because they run on torch tensors every epoch (no host copy, no extra
dependency at run time); these tests are what makes them trustworthy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from sklearn import metrics as sklearn_metrics

from onthefly.engine.metrics import (
    accuracy,
    average_precision,
    binary_scores,
    macro_map,
    pearson,
    seven_class_accuracy,
)
from onthefly.tasks import Classification

CASES = range(40)


def _logits(g: torch.Generator, n: int, classes: int, ties: bool) -> torch.Tensor:
    x = torch.randn(n, classes, generator=g, dtype=torch.float64)
    return (x * 2).round() / 2 if ties else x  # rounded logits: many tied scores within a column


@pytest.mark.parametrize("case", CASES)
def test_accuracy_matches_sklearn(case):
    g = torch.Generator().manual_seed(case)
    n, classes = int(torch.randint(1, 200, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
    logits, labels = _logits(g, n, classes, case % 2 == 0), torch.randint(0, classes, (n,), generator=g)
    expected = sklearn_metrics.accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    assert accuracy(logits, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_average_precision_matches_sklearn(case):
    g = torch.Generator().manual_seed(1000 + case)
    n = int(torch.randint(2, 300, (1,), generator=g))
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if case % 2 == 0:
        scores = (scores * 10).floor() / 10  # ten distinct values: ties everywhere
    positive = torch.rand(n, generator=g) < float(torch.rand((), generator=g))
    if not bool(positive.any()):
        positive[int(torch.randint(0, n, (1,), generator=g))] = True
    expected = sklearn_metrics.average_precision_score(positive.numpy(), scores.numpy())
    assert average_precision(scores, positive) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_macro_map_matches_sklearn_over_the_classes_with_positives(case):
    g = torch.Generator().manual_seed(2000 + case)
    n, classes = int(torch.randint(2, 250, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g))
    logits = _logits(g, n, classes, case % 2 == 0)
    # some classes never occur (left out of the mean, as the metric says)
    present = torch.randperm(classes, generator=g)[: max(1, int(torch.randint(1, classes + 1, (1,), generator=g)))]
    labels = present[torch.randint(0, len(present), (n,), generator=g)]
    probs = torch.softmax(logits, 1).numpy()
    y = labels.numpy()
    aps = [sklearn_metrics.average_precision_score(y == c, probs[:, c]) for c in range(classes) if (y == c).any()]
    assert macro_map(logits, labels) == pytest.approx(float(np.mean(aps)), abs=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_binary_accuracy_and_weighted_f1_match_sklearn(case):
    g = torch.Generator().manual_seed(3000 + case)
    n = int(torch.randint(1, 120, (1,), generator=g))
    target = torch.rand(n, generator=g) < float(torch.rand((), generator=g))
    pred = torch.rand(n, generator=g) < float(torch.rand((), generator=g))
    if case % 5 == 0:
        pred = torch.ones(n, dtype=torch.bool) if case % 10 == 0 else torch.zeros(n, dtype=torch.bool)
    acc, f1 = binary_scores(pred, target)
    t, p = target.numpy(), pred.numpy()
    assert acc == pytest.approx(sklearn_metrics.accuracy_score(t, p), abs=1e-12)
    expected = sklearn_metrics.f1_score(t, p, average="weighted", labels=[True, False], zero_division=0)
    assert f1 == pytest.approx(expected, abs=1e-12)


def test_binary_scores_of_an_empty_set_are_nan():
    acc, f1 = binary_scores(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    assert math.isnan(acc) and math.isnan(f1)


@pytest.mark.parametrize("case", CASES)
def test_pearson_matches_scipy(case):
    g = torch.Generator().manual_seed(4000 + case)
    n = int(torch.randint(2, 200, (1,), generator=g))
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = float(torch.randn((), generator=g)) * x + torch.randn(n, generator=g, dtype=torch.float64)
    assert pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x.numpy(), y.numpy()).statistic, abs=1e-9)


def test_pearson_of_a_constant_is_nan():
    assert math.isnan(pearson(torch.ones(5), torch.arange(5.0)))
    assert math.isnan(pearson(torch.ones(1), torch.ones(1)))


@pytest.mark.parametrize("case", CASES)
def test_seven_class_accuracy_matches_numpy_rounding_and_sklearn(case):
    g = torch.Generator().manual_seed(5000 + case)
    n = int(torch.randint(1, 150, (1,), generator=g))
    score = (torch.randint(-8, 9, (n,), generator=g) / 2).double()  # halves: the rounding ties
    pred = (torch.randn(n, generator=g, dtype=torch.float64) * 2.5).round(decimals=1)
    expected = sklearn_metrics.accuracy_score(
        np.round(np.clip(score.numpy(), -3, 3)), np.round(np.clip(pred.numpy(), -3, 3))
    )
    assert seven_class_accuracy(pred, score) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("case", range(10))
def test_classification_task_metrics_match_sklearn(case):
    """What a run reports: loss, acc, map and the per-group accuracies (AVQA's question types)."""
    g = torch.Generator().manual_seed(6000 + case)
    n, classes, groups = 120, 5, ["a", "b", "c"]
    logits, labels = _logits(g, n, classes, case % 2 == 0).float(), torch.randint(0, classes, (n,), generator=g)
    qtype = torch.randint(0, 2, (n,), generator=g)  # group "c" never occurs: no metric for it
    task = Classification()
    task.target_names = {"qtype": groups}
    out = task.metrics(logits, labels, {"qtype": qtype})
    y, pred = labels.numpy(), logits.argmax(1).numpy()
    probs = torch.softmax(logits.double(), 1).numpy()
    assert out["loss"] == pytest.approx(sklearn_metrics.log_loss(y, probs, labels=list(range(classes))), rel=1e-5)
    assert out["acc"] == pytest.approx(sklearn_metrics.accuracy_score(y, pred))
    aps = [sklearn_metrics.average_precision_score(y == c, probs[:, c]) for c in range(classes) if (y == c).any()]
    assert out["map"] == pytest.approx(float(np.mean(aps)), abs=1e-9)
    for i, name in enumerate(groups):
        chosen = qtype.numpy() == i
        if chosen.any():
            assert out[f"acc_qtype_{name}"] == pytest.approx(sklearn_metrics.accuracy_score(y[chosen], pred[chosen]))
        else:
            assert f"acc_qtype_{name}" not in out
