"""Accuracy and macro mAP (docs/method.md §7) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from onthefly.engine.metrics import accuracy, average_precision, macro_map


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 2.0]])
    labels = torch.tensor([0, 1, 1, 0])
    # argmax: 0, 2, 1, 2 -> hits on samples 0 and 2
    assert accuracy(logits, labels) == pytest.approx(0.5)


def test_accuracy_of_an_empty_batch_is_nan():
    assert math.isnan(accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


def test_ap_perfect_ranking_is_one():
    scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
    assert average_precision(scores, torch.tensor([True, True, False, False])) == pytest.approx(1.0)


def test_ap_single_positive_ranked_third():
    # thresholds 0.9 (R 0), 0.8 (R 0), 0.3 (TP 1, FP 2: P 1/3, R 1) -> AP = 1 * 1/3
    scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
    assert average_precision(scores, torch.tensor([False, False, True, False])) == pytest.approx(1 / 3)


def test_ap_interleaved():
    # order: +, -, +, -
    # 0.9: TP 1 FP 0 -> P 1,   R 1/2
    # 0.8: TP 1 FP 1 -> P 1/2, R 1/2 (no recall step)
    # 0.3: TP 2 FP 1 -> P 2/3, R 1
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
    assert average_precision(scores, torch.tensor([True, False, True, False])) == pytest.approx(5 / 6)


def test_ap_tied_scores_form_one_threshold():
    # 0.8 and 0.8 tie (one positive, one negative): one threshold with TP 1 FP 1 -> P 1/2, R 1/2
    # 0.3: TP 2 FP 1 -> P 2/3, R 1
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12.  Breaking the tie with the positive first would give 5/6.
    scores = torch.tensor([0.8, 0.8, 0.3])
    positive = torch.tensor([True, False, True])
    assert average_precision(scores, positive) == pytest.approx(7 / 12)
    # the order of tied samples in the input does not matter
    assert average_precision(scores[[1, 0, 2]], positive[[1, 0, 2]]) == pytest.approx(7 / 12)


def test_ap_all_tied():
    # one threshold: TP 1 FP 3 -> P 1/4, R 1 -> AP = 1/4 (the positive rate)
    scores = torch.full((4,), 0.5)
    assert average_precision(scores, torch.tensor([False, True, False, False])) == pytest.approx(0.25)


def test_ap_without_positives_is_nan():
    assert math.isnan(average_precision(torch.tensor([0.2, 0.1]), torch.tensor([False, False])))


def test_macro_map_by_hand_with_ties_and_an_empty_class():
    # softmax rows: a = [e^3, 1, 1]/(e^3+2) ~ [.909, .045, .045],  b = [e, 1, 1]/(e+2) ~ [.576, .212, .212]
    logits = torch.tensor(
        [
            [3.0, 0.0, 0.0],  # r0  label 0   probs a
            [0.0, 3.0, 0.0],  # r1  label 1   probs a, permuted (class 1 ~ .909)
            [3.0, 0.0, 0.0],  # r2  label 1   identical to r0: ties r0 in every column
            [1.0, 0.0, 0.0],  # r3  label 0   probs b
            [0.0, 1.0, 0.0],  # r4  label 1   probs b, permuted (class 1 ~ .576)
        ]
    )
    labels = torch.tensor([0, 1, 1, 0, 1])  # class 2 has no positive: left out of the mean
    # class 0 (positives r0, r3), column 0 ranks {r0, r2} .909 > r3 .576 > r4 .212 > r1 .045
    #   .909: TP 1 FP 1 -> P 1/2, R 1/2;  .576: TP 2 FP 1 -> P 2/3, R 1
    #   AP0 = 1/2 * 1/2 + 1/2 * 2/3 = 7/12
    # class 1 (positives r1, r2, r4), column 1 ranks r1 .909 > r4 .576 > r3 .212 > {r0, r2} .045
    #   .909: P 1, R 1/3;  .576: P 1, R 2/3;  .212: P 2/3, R 2/3 (no step);  .045: TP 3 FP 2 -> P 3/5, R 1
    #   AP1 = 1/3 + 1/3 + 1/3 * 3/5 = 13/15
    # mAP = (7/12 + 13/15) / 2 = 87/120 (counting class 2 as 0 would give 87/180)
    assert macro_map(logits, labels) == pytest.approx(87 / 120)
    assert accuracy(logits, labels) == pytest.approx(4 / 5)  # r2 is predicted 0


def test_macro_map_ranks_softmax_scores_not_raw_logits():
    # A: logits [2, 5] label 1 -> softmax [.047, .953];  B: logits [1, 0] label 0 -> softmax [.731, .269]
    # softmax: class 0 ranks B > A (AP 1), class 1 ranks A > B (AP 1) -> mAP 1
    # raw logits would rank A > B in column 0 (AP 1/2) -> mAP 3/4
    logits = torch.tensor([[2.0, 5.0], [1.0, 0.0]])
    labels = torch.tensor([1, 0])
    assert macro_map(logits, labels) == pytest.approx(1.0)


def test_macro_map_is_nan_without_labels():
    assert math.isnan(macro_map(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
