"""The imbalance and cost metrics of every run: Shapley contributions (two and three modalities) against a brute-force
sum over orderings, FLOPs of known layers, the metrics in results.json and W&B's summary, and the FLOP count leaving
the run's numbers unchanged (the conditional utilisation rate itself is tested in test_complex_models.py)."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from torch import nn

from onthefly.engine.imbalance import flops_of, parameter_counts, shapley_metrics, shapley_shares
from onthefly.models.fusion import ConcatFusion
from onthefly.modulation.valuation import sample_shapley, shapley_matrix, subset_correct

from conftest import read_metrics


def brute_force_shapley(value, m_count: int) -> list[float]:
    """φ_m = mean over all orderings of the modalities of m's marginal contribution v(before ∪ {m}) - v(before)."""
    phi = [0.0] * m_count
    orders = list(itertools.permutations(range(m_count)))
    for order in orders:
        before = 0
        for m in order:
            phi[m] += value(before | 1 << m) - value(before)
            before |= 1 << m
    return [p / len(orders) for p in phi]


@pytest.mark.parametrize("m_count", [2, 3])
def test_shapley_matrix_equals_the_sum_over_orderings(m_count):
    g = torch.Generator().manual_seed(m_count)
    values = torch.rand(2**m_count, generator=g, dtype=torch.float64)
    phi = values @ shapley_matrix(m_count)
    assert phi.tolist() == pytest.approx(brute_force_shapley(lambda s: float(values[s]), m_count))
    assert float(phi.sum()) == pytest.approx(float(values[-1] - values[0]))  # efficiency


def test_three_modality_sample_shapley_and_dataset_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(6, 8, generator=g) > 0.5  # 6 samples, subsets of three modalities
    phi = sample_shapley(correct, "scaled")
    for i in range(6):
        value = lambda s, i=i: 0.0 if s == 0 else bin(s).count("1") * float(correct[i, s])  # noqa: E731
        assert phi[i].tolist() == pytest.approx(brute_force_shapley(value, 3))
    out = shapley_metrics(correct, ["a", "v", "s"], "correct")
    accuracy = correct.double().mean(0)
    dataset = brute_force_shapley(lambda s: float(accuracy[s]), 3)  # v(∅) = accuracy with every feature zeroed
    assert [out[f"shapley_{m}"] for m in "avs"] == pytest.approx(dataset)
    shares = shapley_shares({m: out[f"shapley_{m}"] for m in "avs"})
    assert sum(shares.values()) == pytest.approx(1.0) and shares["a"] == pytest.approx(dataset[0] / sum(dataset))
    assert shapley_shares({"a": 0.1, "v": -0.1}) == {"a": None, "v": None}  # undefined: no NaN in results.json
    plain = sample_shapley(correct, "correct").mean(0).tolist()
    assert [out[f"shapley_sample_{m}"] for m in "avs"] == pytest.approx(plain)


def _concat_head() -> ConcatFusion:
    """Class logits = 2·a - b for audio features a and visual features b (2 classes, 1-d features)."""
    head = ConcatFusion({"audio": 1, "visual": 1}, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[2.0, -1.0], [-2.0, 1.0]]))
        head.fc.bias.zero_()
    return head


def test_subset_predictions_zero_the_left_out_features():
    head = _concat_head()
    feats = {"audio": torch.tensor([[1.0], [-1.0]]), "visual": torch.tensor([[3.0], [-3.0]])}
    labels = torch.tensor([1, 0])
    correct = subset_correct(head, feats, labels, lambda z: z)
    # ∅: logits 0, argmax class 0; {a}: class 0 then 1; {v}: class 1 then 0; {a, v}: 2a - v = -1, 1 -> class 1, 0
    assert correct.tolist() == [[False, False, True, True], [True, False, True, True]]


def test_flops_of_known_layers_and_parameter_counts():
    linear = nn.Linear(8, 4)
    assert flops_of(lambda: linear(torch.randn(5, 8))) == 2 * 5 * 8 * 4
    conv = nn.Conv2d(3, 4, 3, bias=False)
    assert flops_of(lambda: conv(torch.randn(1, 3, 8, 8))) == 2 * (4 * 6 * 6) * (3 * 3 * 3)
    x = torch.randn(5, 8, requires_grad=True)
    # forward + backward: the weight and the input gradients are one matmul each of the same size
    assert flops_of(lambda: linear(x).sum().backward()) == 3 * 2 * 5 * 8 * 4
    bn = nn.BatchNorm1d(4)
    counts = parameter_counts([linear, bn, linear.requires_grad_(False)])
    assert counts == {"params": 8 * 4 + 4 + 4 + 4, "params_trainable": 8, "buffers": 4 + 4 + 1}


@pytest.mark.slow
def test_the_metrics_land_in_results_and_measuring_them_changes_no_number(train_run):
    method = ["modulation=opm_ogm", "modulation.opm.q_source=previous"]  # random draws and state between steps
    results, out = train_run(*method, name="measured")
    for m in ("audio", "visual"):
        for key in (f"shapley_{m}", f"shapley_sample_{m}"):
            assert key in results["test"], key
        assert results["imbalance"][f"shapley/{m}"] == results["test"][f"shapley_{m}"]
        assert f"shapley_share/{m}" in results["imbalance"]
        assert read_metrics(out)[f"val/shapley_{m}"].notna().sum() == 2  # a curve: val after every epoch
    cost = results["cost"]
    assert cost["params"] > 0 and cost["flops_per_step"] > 3 * 16 * cost["flops_eval_per_sample"] * 0.5
    assert results["imbalance"]["cost/flops_per_step"] == cost["flops_per_step"]
    _, plain = train_run(
        *method,
        "trainer.imbalance.cost=false",
        "trainer.imbalance.shapley=off",
        "trainer.imbalance.utilization=off",
        name="plain",
    )
    numbers = read_metrics(out)
    numbers = numbers[[c for c in read_metrics(plain).columns if not c.startswith("time/")]]
    pd.testing.assert_frame_equal(numbers, read_metrics(plain).drop(columns=["time/epoch_s"]), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(out / "steps.csv"), pd.read_csv(plain / "steps.csv"), check_exact=True)
    test = results["test"]
    assert test["d_util"] == pytest.approx(test["cur_visual_given_audio"] - test["cur_audio_given_visual"])
    assert results["imbalance"]["cur/d_util"] == test["d_util"]


def test_the_table_keys_reach_the_wandb_summary():
    from onthefly.logging.names import summary_for_wandb

    results = {
        "best": {"epoch": 0},
        "test": {"acc": 0.5, "shapley_audio": 0.2},
        "imbalance": {"shapley/audio": 0.2, "cost/flops_per_step": 10},
    }
    summary = summary_for_wandb(results, [])
    assert (
        summary["shapley/audio"] == 0.2
        and summary["cost/flops_per_step"] == 10
        and summary["test/shapley_audio"] == 0.2
    )
