"""Methods that change the step or the epochs (MLA, ReconBoost, Diagnosing & Re-learning, modality valuation): their
math on fixed tensors against hand-worked values or independent formulas, and one tiny end-to-end run each."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from onthefly.modulation.base import StepContext
from onthefly.modulation.mla import MLA, SharedHead, fusion_weights, owm_update, step_alpha
from onthefly.modulation.reconboost import EnsembleHead, ReconBoost, StageSchedule, boosting_loss, reconcilement
from onthefly.modulation.relearning import Relearning, kmeans, minmax_scale, purity, reinit_weight, soft_reinit
from onthefly.modulation.valuation import kept_modality, modality_extra, sample_copies, sample_shapley, tag

from conftest import read_metrics, read_results


# --- MLA -------------------------------------------------------------------------------------------------------
def test_owm_update_deflates_p_along_the_feature():
    r = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    alpha = 0.1
    p = owm_update(torch.eye(3, dtype=torch.float64), r, alpha)
    # from the identity: P = I - r rᵀ / (α + |r|²), so P r = α / (α + 25) r and P leaves r's complement alone
    assert torch.allclose(p, torch.eye(3, dtype=torch.float64) - torch.outer(r, r) / (alpha + 25))
    assert torch.allclose(p @ r, alpha / (alpha + 25) * r)
    assert torch.allclose(
        p @ torch.tensor([4.0, -3.0, 0.0], dtype=torch.float64), torch.tensor([4.0, -3.0, 0.0], dtype=torch.float64)
    )
    assert step_alpha(0.1, 0, 10) == pytest.approx(0.1) and step_alpha(0.1, 5, 10) == pytest.approx(0.1**1.5)
    assert step_alpha(0.1, 3, None) == pytest.approx(0.1)


def _head_with_grad(grad: torch.Tensor) -> MLA:
    method = MLA()
    method.head = SharedHead({"audio": 2, "visual": 2}, 2)
    method.head.fc.weight.grad = grad.clone()
    method.P = torch.eye(2)
    return method


def _ctx():
    return StepContext(epoch=0, step=0, global_step=0, model=None, modalities=["audio", "visual"], steps_in_epoch=4)


def test_mla_projection_forms_on_a_known_gradient():
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    z1, z2 = torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])  # means (2, 0), (0, 2)
    # owm: the first sub-step meets P = I (no change), P then deflates along (2, 0); the second is projected by it
    m = _head_with_grad(g)
    m.modify_head_gradient(z1, _ctx())
    assert torch.equal(m.head.fc.weight.grad, g)
    p1 = torch.diag(torch.tensor([0.1 / 4.1, 1.0]))
    assert torch.allclose(m.P, p1)
    m.head.fc.weight.grad = g.clone()
    m.modify_head_gradient(z2, _ctx())
    assert torch.allclose(m.head.fc.weight.grad, g @ p1.t())
    # code: the official order skips the very first sub-step, then updates P with the current feature, normalises
    # it (Frobenius) and projects
    m = _head_with_grad(g)
    m.projection = m.projection.__class__("code")
    m.modify_head_gradient(z1, _ctx())
    assert torch.equal(m.head.fc.weight.grad, g) and torch.equal(m.P, torch.eye(2))
    m.modify_head_gradient(z2, _ctx())
    p = torch.diag(torch.tensor([1.0, 0.1 / 4.1]))
    p = p / p.norm()
    assert torch.allclose(m.head.fc.weight.grad, g @ p.t())
    # additive (the benchmark's): g + g·Pᵀ
    m = _head_with_grad(g)
    m.projection = m.projection.__class__("additive")
    m.modify_head_gradient(z1, _ctx())
    m.modify_head_gradient(z2, _ctx())
    assert torch.allclose(m.head.fc.weight.grad, g + g @ p.t())
    # released: the official code as it runs, no projection at all
    m = _head_with_grad(g)
    m.variant = m.variant.__class__("released")
    m.modify_head_gradient(z1, _ctx())
    m.modify_head_gradient(z2, _ctx())
    assert torch.equal(m.head.fc.weight.grad, g) and torch.equal(m.P, torch.eye(2))


def _entropy(logits: np.ndarray, axis: int) -> np.ndarray:
    p = np.exp(logits - logits.max(axis=axis, keepdims=True))
    p = p / p.sum(axis=axis, keepdims=True)
    return -(p * np.log(p)).sum(axis=axis)


def test_mla_fusion_weights_per_sample_and_per_batch():
    ua = np.array([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])  # confident, uniform, mild
    uv = np.array([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    w = fusion_weights([torch.tensor(ua), torch.tensor(uv)], "dynamic").numpy()
    ea, ev = _entropy(ua, 1), _entropy(uv, 1)
    top = np.maximum(ea, ev)
    expect_a = np.exp(top - ea) / (np.exp(top - ea) + np.exp(top - ev))
    np.testing.assert_allclose(w[:, 0], expect_a, rtol=1e-6)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    assert w[0, 0] > 0.5 and w[1, 0] < 0.5  # the confident modality counts more, per sample
    # the official rule: softmax over the samples of each run of `batch` rows, entropy summed over the run
    wb = fusion_weights([torch.tensor(ua), torch.tensor(uv)], "dynamic_batch", batch=2).numpy()
    for rows in (slice(0, 2), slice(2, 3)):
        ea, ev = _entropy(ua[rows], 0).sum(), _entropy(uv[rows], 0).sum()
        top = max(ea, ev)
        np.testing.assert_allclose(wb[rows, 0], np.exp(top - ea) / (np.exp(top - ea) + np.exp(top - ev)), rtol=1e-6)
    wf = fusion_weights([torch.tensor(ua), torch.tensor(uv)], "fixed", fixed=[0.3, 0.7])
    assert torch.allclose(wf, torch.tensor([[0.3, 0.7]] * 3, dtype=wf.dtype))


def test_shared_head_fuses_what_it_was_given_and_refuses_unequal_widths():
    head = SharedHead({"audio": 2, "visual": 2}, 3, "fixed", [0.25, 0.75])
    feats = {"audio": torch.randn(4, 2), "visual": torch.randn(4, 2)}
    expected = 0.25 * head.fc(feats["audio"]) + 0.75 * head.fc(feats["visual"])
    assert torch.allclose(head(feats), expected)
    assert torch.allclose(head.unimodal_logits(feats)["visual"], head.fc(feats["visual"]))
    with pytest.raises(ValueError, match="feature widths"):
        SharedHead({"audio": 2, "visual": 3}, 3)


# --- ReconBoost ------------------------------------------------------------------------------------------------
def test_boosting_loss_against_the_written_out_sum():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    labels = torch.tensor([0, 2])
    others = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    loss, weight = boosting_loss(logits, labels, others, w1=5.0, w2=1.0)
    terms = []
    for i, y in enumerate(labels.tolist()):
        log_p = logits[i, y] - math.log(sum(math.exp(v) for v in logits[i].tolist()))
        terms.append(-(5.0 - 1.0 * others[i, y].item()) / 3 * float(log_p))
    assert loss.item() == pytest.approx(sum(terms) / 2, rel=1e-6)
    assert weight.item() == pytest.approx(((5 - 0.7) + (5 - 0.8)) / 2)
    # no other learner yet: p̃(y) = 1 (the official empty ensemble), weight w1 - w2
    loss0, weight0 = boosting_loss(logits, labels, None, w1=5.0, w2=1.0)
    assert weight0.item() == pytest.approx(4.0)
    assert loss0.item() == pytest.approx(-4.0 / 3 * torch.log_softmax(logits, 1)[[0, 1], [0, 2]].mean().item())


def test_reconcilement_has_a_gradient_only_in_the_paper_variant():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    prev = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    paper = reconcilement(f, prev, "paper")
    expected = ((torch.softmax(f, 1) - torch.softmax(prev, 1)) ** 2).mean()
    assert paper.item() == pytest.approx(expected.item())
    (grad,) = torch.autograd.grad(paper, f)
    assert grad.abs().sum() > 0
    released = reconcilement(f, prev, "released")
    assert released.item() == pytest.approx(expected.item()) and not released.requires_grad


def test_stage_schedule_phases_members_and_previous():
    s = StageSchedule(["audio", "visual"], boost=2, rectify=1)
    assert [s.phase(e) for e in range(7)] == [
        "boost_audio",
        "boost_audio",
        "rectify",
        "boost_visual",
        "boost_visual",
        "rectify",
        "boost_audio",
    ]
    assert [s.members(e) for e in (0, 2, 3, 6)] == [["audio"], ["audio"], ["audio", "visual"], ["audio", "visual"]]
    assert [s.previous(e) for e in (0, 3, 6)] == [None, "audio", "visual"]


class _Encoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"audio": nn.Linear(2, 4), "visual": nn.Linear(2, 4)})
        self.head = None

    @property
    def modalities(self):
        return list(self.encoders)

    @property
    def feature_dims(self):
        return {m: 4 for m in self.encoders}


def test_reconboost_phase_groups_and_lr_decay():
    model = _Encoders()
    method = ReconBoost(boost_epochs=1, rectify_epochs=1, boost_lr=0.1, rectify_lr=0.2, lr_decay=0.5, lr_decay_every=1)
    method.setup(model, 3)
    assert isinstance(model.head, EnsembleHead)

    def ids(group):
        return {id(p) for p in group["params"]}

    boost = method.param_groups(model, None, 0)[0]  # stage 0, boost audio
    assert ids(boost) == {id(p) for p in [*model.encoders["audio"].parameters(), *model.head.classifier.parameters()]}
    assert boost["lr"] == pytest.approx(0.1) and boost["weight_decay"] == pytest.approx(5e-4)
    rectify = method.param_groups(model, None, 1)[0]  # stage 0 rectify: audio is the only member
    assert id(model.head.boost_rate) in ids(rectify) and not ids(rectify) & {
        id(p) for p in model.encoders["visual"].parameters()
    }
    late = method.param_groups(model, None, 3)[0]  # stage 1 rectify: both members, lr halved once
    assert {id(p) for p in model.encoders["visual"].parameters()} <= ids(late)
    assert late["lr"] == pytest.approx(0.1)
    # the ensemble head: β Σ over members of H(z_m)
    feats = {"audio": torch.randn(3, 4), "visual": torch.randn(3, 4)}
    model.head.set_members(["audio"])
    assert torch.allclose(model.head(feats), model.head.classifier(feats["audio"]))
    model.head.set_members(["audio", "visual"])
    with torch.no_grad():
        model.head.boost_rate.fill_(2.0)
    assert torch.allclose(
        model.head(feats), 2 * (model.head.classifier(feats["audio"]) + model.head.classifier(feats["visual"]))
    )


# --- Diagnosing & Re-learning --------------------------------------------------------------------------------------
def test_purity_scaling_and_kmeans_on_known_clusters():
    assert purity(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0])) == pytest.approx(3 / 5)
    x = torch.tensor([[0.0, 5.0, 1.0], [2.0, 5.0, 3.0], [1.0, 5.0, 2.0]])
    assert torch.allclose(minmax_scale(x), torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, 1.0], [0.0, -1.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(20)
    points = centres[labels] + 0.3 * torch.randn(60, 2, generator=g)
    clusters = kmeans(points, 3, n_init=3, seed=0)
    assert purity(clusters, labels) == 1.0
    assert torch.equal(clusters, kmeans(points, 3, n_init=3, seed=0))  # seeded


def test_reinit_rule_blends_towards_the_initial_weights():
    assert reinit_weight(0.9, 0.6, 3.0) == pytest.approx(math.tanh(0.9))
    assert reinit_weight(0.5, 0.5, 3.0) == 0.0
    p, p0 = nn.Parameter(torch.tensor([1.0, 2.0])), torch.tensor([3.0, -2.0])
    soft_reinit([p], [p0], 0.25)
    assert torch.allclose(p.data, torch.tensor([0.25 * 3 + 0.75 * 1, 0.25 * -2 + 0.75 * 2]))


def test_relearning_refuses_a_val_split_that_is_the_test_split():
    batch = ({"audio": torch.ones(2, 3)}, torch.tensor([0, 1]))
    other = ({"audio": torch.zeros(2, 3)}, torch.tensor([0, 1]))

    def batches(split, limit=None, with_index=False):
        return iter([batch if split in ("val", "test") else other])

    ctx = StepContext(epoch=0, step=0, global_step=0, model=None, modalities=["audio"], batches=batches)
    with pytest.raises(ValueError, match="val_fraction"):
        Relearning().train_start(ctx)

    def distinct(split, limit=None, with_index=False):
        return iter([batch if split == "val" else other])

    Relearning().train_start(
        StepContext(epoch=0, step=0, global_step=0, model=None, modalities=["audio"], batches=distinct)
    )


# --- valuation -----------------------------------------------------------------------------------------------------
def test_sample_shapley_matches_the_two_modality_formula_and_the_copy_rule():
    # columns: subsets by bitmask (bit 0 audio, bit 1 visual): ∅, {a}, {v}, {a, v}
    correct = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    phi = sample_shapley(correct, "scaled")
    va, vv, vav = correct[:, 1].double(), correct[:, 2].double(), 2 * correct[:, 3].double()
    assert torch.allclose(phi[:, 0], (va + vav - vv) / 2) and torch.allclose(phi[:, 1], (vv + vav - va) / 2)
    assert phi[:, 0].tolist() == [1.5, 0.5, 0.0, 1.0, -0.5]
    assert sample_copies(torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5])).tolist() == [3, 2, 1, 0, 0]


def test_modality_extra_and_tags():
    d, keep = modality_extra(torch.tensor([0.9, 0.3]), alpha=1.0, growth="linear")  # gaps 0.1, 0.7
    assert d == pytest.approx(0.6 * 2 / 3) and keep == 1
    assert modality_extra(torch.tensor([0.9, 0.3]), 1.0, "tanh")[0] == pytest.approx(math.tanh(0.4))
    assert modality_extra(torch.tensor([0.9, 0.3]), 0.5, "square")[0] == pytest.approx(0.5 * 0.4**1.5)
    n, m_count = 10, 2
    chosen, keep = torch.tensor([3, 3, 3, 4, 3]), torch.tensor([0, 0, 1, 0, 0])
    tagged = tag(chosen, keep, n, m_count)
    assert len(set(tagged.tolist())) == 5  # repeats get their own tag (their own augmentation draw)
    assert (tagged % n).tolist() == chosen.tolist()
    assert kept_modality(tagged, n, m_count).tolist() == keep.tolist()
    assert kept_modality(torch.arange(n), n, m_count).tolist() == [-1] * n


# --- end to end on the synthetic benchmark ---------------------------------------------------------------------------
@pytest.mark.slow
def test_mla_runs_and_best_pt_predicts_with_its_fusion(train_run):
    from onthefly.data.loaders import make_loader
    from onthefly.engine.analysis import load_run
    from onthefly.engine.evaluation import evaluate

    results, out = train_run("modulation=mla")
    assert results["status"] == "ok"
    steps = pd.read_csv(out / "steps.csv")
    for col in ("train/loss_audio", "train/loss_visual", "train/acc_audio", "train/mla_alpha", "train/mla_trace_p"):
        assert steps[col].notna().all(), col
    cfg, model, splits, device = load_run(out, "cpu")
    assert isinstance(model.head, SharedHead)
    acc = evaluate(model, make_loader(splits.test, 32, False, 0, 0, device), device, "natural")["acc"]
    assert acc == pytest.approx(results["test"]["acc"])


@pytest.mark.slow
def test_mla_released_with_batch_fusion_runs(train_run):
    results, out = train_run(
        "modulation=mla", "modulation.variant=released", "modulation.fusion=dynamic_batch", "trainer.epochs=1"
    )
    assert results["status"] == "ok" and "train/mla_alpha" not in pd.read_csv(out / "steps.csv").columns


@pytest.mark.slow
def test_reconboost_runs_its_phases_with_their_optimizers(train_run):
    results, out = train_run(
        "modulation=reconboost",
        "modulation.boost_epochs=1",
        "modulation.rectify_epochs=1",
        "modulation.boost_lr=0.02",
        "modulation.rectify_lr=0.01",
    )
    epochs = read_metrics(out)
    epochs = epochs[epochs["phase"].notna()]
    assert epochs["phase"].tolist() == ["boost_audio", "rectify"]
    assert epochs["lr"].tolist() == pytest.approx([0.02, 0.01])
    assert epochs["train/boost_weight"].tolist()[0] == pytest.approx(4.0)  # no other learner yet: w1 - w2
    assert results["status"] == "ok" and "shapley_audio" in results["test"]
    cost = results["cost"]  # a boost step trains one encoder: cheaper than a rectify step; 4 steps in each phase
    assert cost["flops_per_step"] == cost["flops_per_step_boost_audio"] < cost["flops_per_step_rectify"]
    assert cost["flops_train_total"] == 4 * (cost["flops_per_step_boost_audio"] + cost["flops_per_step_rectify"])


@pytest.mark.slow
def test_relearning_diagnoses_and_logs_purities(train_run):
    results, out = train_run("modulation=relearning", "modulation.every=1")
    row = read_metrics(out).iloc[1]  # the diagnosis after epoch 1
    for m in ("audio", "visual"):
        assert 0 < row[f"train/purity_train_{m}"] <= 1 and 0 < row[f"train/purity_val_{m}"] <= 1
        gap = abs(row[f"train/purity_train_{m}"] - row[f"train/purity_val_{m}"])
        assert row[f"train/reinit_{m}"] == pytest.approx(math.tanh(3.0 * gap), rel=1e-5)
    assert results["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("level", ["sample", "modality"])
def test_valuation_resamples_the_next_epoch(train_run, level):
    results, out = train_run("modulation=valuation", f"modulation.level={level}", "modulation.warmup=1")
    epochs = read_metrics(out)
    size = int(epochs["train/epoch_size"].iloc[0])
    assert size >= 64
    steps = pd.read_csv(out / "steps.csv")
    assert (steps["epoch"] == 1).sum() == math.ceil(size / 16) - (size % 16 == 1)
    assert results["status"] == "ok" and read_results(out)["status"] == "ok"


@pytest.mark.parametrize("method", ["mla", "reconboost", "relearning", "valuation"])
@pytest.mark.parametrize("preset", ["tpami2024/cremad", "tpami2024/kinetics_sounds", "cvpr2022/cremad"])
def test_each_method_composes_with_the_real_dataset_presets(method, preset):
    """The presets' full-width ResNet18s (no data needed): the config validates and the method sets up its model."""
    from hydra.utils import instantiate

    from onthefly.config import compose, validate
    from onthefly.models.multimodal import build_model

    cfg = compose([f"experiment={preset}", f"modulation={method}", "optim=sgd"])
    validate(cfg)
    model = build_model(cfg, ["audio", "visual"], 6)
    instantiate(cfg.modulation).setup(model, 6)
    assert model.head.num_classes == 6


@pytest.mark.slow
def test_mla_under_fp16_and_counting_its_flops_changes_no_number(train_run):
    """M sub-steps per batch, each with the GradScaler's unscale and update; counting the FLOPs of an epoch's first
    step (FlopCounterMode around the real step) must not change a number."""
    common = ["modulation=mla", "trainer.precision=fp16", "trainer.epochs=1"]
    counted, out = train_run(*common, name="counted")
    _, plain = train_run(*common, "trainer.imbalance.cost=false", name="plain")
    assert counted["cost"]["flops_per_step"] > 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "steps.csv"), pd.read_csv(plain / "steps.csv"), check_exact=True)
