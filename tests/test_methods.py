"""The equations of docs/method.md, checked by hand: scores and ρ, OGM, OGM-GE, OPM, the baselines, and the
uni-modal estimators of the fusion heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.models import MultimodalModel
from onthefly.models.encoders import MLPEncoder, ResNet18
from onthefly.models.fusion import (
    ConcatFusion,
    EstimatorUnavailable,
    FiLMFusion,
    GatedFusion,
    MLPFusion,
    SumFusion,
)
from onthefly.modulation.base import StepContext
from onthefly.modulation.baselines import GradientBlending, ModalityDropout
from onthefly.modulation.discrepancy import discrepancy, ratios, scores
from onthefly.modulation.ogm import OGM, modulate_gradients, ogm_coefficients, select_parameters
from onthefly.modulation.opm import OPM, drop_features, opm_drop_probs, rescale_factors
from onthefly.modulation.opm_ogm import OPMOGM

AV = ["audio", "visual"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv_model(head_cls=ConcatFusion, num_classes=3) -> MultimodalModel:
    encoders = {
        "audio": ResNet18(in_channels=1, width=4, stem="small"),
        "visual": ResNet18(in_channels=3, width=4, stem="small"),
    }
    head = head_cls({m: e.out_dim for m, e in encoders.items()}, num_classes)
    return MultimodalModel(encoders, head)


def mlp_model(num_classes=3) -> MultimodalModel:
    encoders = {"audio": MLPEncoder(in_dim=5, hidden=6, out_dim=4), "visual": MLPEncoder(in_dim=7, hidden=6, out_dim=4)}
    return MultimodalModel(encoders, ConcatFusion({m: 4 for m in encoders}, num_classes))


def assert_close(actual, expected, rtol=1.3e-6, atol=1e-5, msg=""):
    """Same shape and values within tolerance (torch.testing.assert_close imports torch.distributed: ~2 s)."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"{msg}\n{actual}\n!=\n{expected}"


def fill_grads(model: nn.Module, value: float = 1.0) -> None:
    """Give every parameter a known gradient (as if backward had run)."""
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def ctx_for(model, epoch=0, rho=(2.0, 0.5), modalities=AV, **kw) -> StepContext:
    return StepContext(
        epoch=epoch, step=0, global_step=0, model=model, modalities=list(modalities), rho=torch.tensor(rho), **kw
    )


# --- §2 scores and ρ -------------------------------------------------------------------------------------------
def test_scores_are_a_batch_sum_of_true_class_probabilities():
    # audio: softmax rows [1/2, 1/2] and [3/4, 1/4]; labels [0, 1] -> s = 1/2 + 1/4 = 3/4
    # visual: softmax rows [1/5, 4/5] and [1/3, 2/3] -> s = 1/5 + 2/3 = 13/15
    z = {
        "audio": torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]),
        "visual": torch.tensor([[0.0, math.log(4)], [0.0, math.log(2)]]),
    }
    s = scores(z, torch.tensor([0, 1]))
    assert s.dtype == torch.float32
    assert_close(s, torch.tensor([3 / 4, 13 / 15]))


def test_scores_are_float32_and_detached_under_low_precision():
    z = {"a": torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True), "b": torch.randn(4, 3).half()}
    s = scores(z, torch.tensor([0, 1, 2, 0]))
    assert s.dtype == torch.float32 and not s.requires_grad


def test_ratios_two_modalities():
    for reduce in ("pairwise", "min", "sum_others"):  # all coincide for M = 2
        assert_close(ratios(torch.tensor([3.0, 1.5]), reduce), torch.tensor([2.0, 0.5]))


@pytest.mark.parametrize(
    "reduce,expected",
    [
        # s = [4, 2, 1]
        ("pairwise", [(4 / 2 + 4 / 1) / 2, (2 / 4 + 2 / 1) / 2, (1 / 4 + 1 / 2) / 2]),  # [3, 1.25, 0.375]
        ("min", [4 / 1, 2 / 1, 1 / 2]),
        ("sum_others", [4 / 3, 2 / 5, 1 / 6]),
    ],
)
def test_ratios_three_modalities(reduce, expected):
    assert_close(ratios(torch.tensor([4.0, 2.0, 1.0]), reduce), torch.tensor(expected))


@pytest.mark.parametrize("reduce", ["pairwise", "min", "sum_others"])
@pytest.mark.parametrize("s", [[0.0, 0.0], [2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
def test_zero_scores_never_give_nan(reduce, s):
    rho = ratios(torch.tensor(s), reduce)
    assert torch.isfinite(rho).all(), rho
    assert torch.isfinite(ogm_coefficients(rho, 0.8)).all()
    assert torch.isfinite(opm_drop_probs(rho, 0.5, 0.5)).all()


def test_discrepancy_forms_rho_from_scores_summed_over_ranks():
    z = {"audio": torch.tensor([[0.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}  # s = [1/2, 1/2] here
    other_rank = torch.tensor([2.5, 0.5])  # the other rank's scores
    s, rho = discrepancy(z, torch.tensor([0]), all_reduce=lambda t: t + other_rank)
    assert_close(s, torch.tensor([3.0, 1.0]))
    assert_close(rho, torch.tensor([3.0, 1 / 3]))


# --- §3 OGM ------------------------------------------------------------------------------------------------------
def test_ogm_coefficients_paper_and_shifted():
    rho = torch.tensor([2.0, 0.5])
    assert_close(ogm_coefficients(rho, 0.8, "paper"), torch.tensor([1 - math.tanh(1.6), 1.0]))
    assert_close(ogm_coefficients(rho, 0.8, "shifted"), torch.tensor([1 - math.tanh(0.8), 1.0]))


def test_ogm_coefficient_jumps_as_rho_crosses_one():
    rho = torch.tensor([1.0, 1.0 + 1e-6])
    paper = ogm_coefficients(rho, 0.8, "paper")
    assert paper[0] == 1.0  # ρ = 1 is not dominant
    assert paper[1] == pytest.approx(1 - math.tanh(0.8), abs=1e-5)  # jumps straight to 1 - tanh(α)
    shifted = ogm_coefficients(rho, 0.8, "shifted")
    assert shifted[0] == 1.0 and shifted[1] == pytest.approx(1.0, abs=1e-5)  # continuous


def test_ogm_with_zero_alpha_and_no_noise_leaves_gradients_untouched():
    model = conv_model()
    ogm = OGM(alpha=0.0, ge=False)
    ogm.setup(model, 3)
    fill_grads(model)
    for p in model.parameters():
        p.grad.normal_()
    before = grads_of(model)
    ctx = ctx_for(model, rho=(5.0, 0.2))
    ogm.after_backward(ctx)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n
    assert_close(torch.stack([ctx.metrics["k_audio"], ctx.metrics["k_visual"]]), torch.ones(2))


def test_ogm_scales_only_the_dominant_encoders_conv_kernels():
    model = conv_model()
    ogm = OGM(alpha=0.8, ge=False, scope="conv")
    ogm.setup(model, 3)
    fill_grads(model)
    ctx = ctx_for(model, rho=(2.0, 0.5))
    ogm.after_backward(ctx)
    k = 1 - math.tanh(1.6)
    assert ctx.metrics["k_audio"].item() == pytest.approx(k, rel=1e-6)
    assert ctx.metrics["k_visual"].item() == 1.0
    scaled = 0
    for n, p in model.named_parameters():
        if n.startswith("encoders.audio.") and p.dim() == 4:
            assert_close(p.grad, torch.full_like(p, k))
            scaled += 1
        else:  # BN of audio, the whole visual encoder, and the head keep their gradient
            assert torch.equal(p.grad, torch.ones_like(p)), n
    assert scaled == 1 + 8 * 2 + 3  # stem + 8 blocks x 2 convs + 3 shortcut convs


def test_conv_scope_selects_4d_encoder_weights_and_never_the_head():
    model = conv_model()
    ogm = OGM(scope="conv")
    ogm.setup(model, 3)
    head_ids = {id(p) for p in model.head.parameters()}
    for m, enc in model.encoders.items():
        chosen = {id(p) for p in ogm.params[m]}
        assert chosen == {id(p) for p in enc.parameters() if p.dim() == 4}
        assert chosen and not chosen & head_ids
        conv_weights = {id(mod.weight) for mod in enc.modules() if isinstance(mod, nn.Conv2d)}
        assert chosen == conv_weights


def test_all_scope_selects_every_matrix_of_an_mlp_encoder():
    model = mlp_model()
    ogm = OGM(scope="all", alpha=0.8, ge=False)
    ogm.setup(model, 3)
    for m, enc in model.encoders.items():
        linears = [mod for mod in enc.modules() if isinstance(mod, nn.Linear)]
        assert {id(p) for p in ogm.params[m]} == {id(mod.weight) for mod in linears}  # weights, not biases
    fill_grads(model)
    ogm.after_backward(ctx_for(model, rho=(0.5, 2.0)))
    k = 1 - math.tanh(1.6)
    for mod in model.encoders["visual"].modules():
        if isinstance(mod, nn.Linear):
            assert_close(mod.weight.grad, torch.full_like(mod.weight, k))
            assert torch.equal(mod.bias.grad, torch.ones_like(mod.bias))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.encoders["audio"].parameters())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.head.parameters())


def test_conv_scope_on_mlp_encoders_warns():
    with pytest.warns(UserWarning, match="scope=all"):
        OGM(scope="conv").setup(mlp_model(), 3)


def test_select_parameters_skips_frozen_tensors():
    enc = MLPEncoder(in_dim=3, hidden=4, out_dim=2)
    enc.net[0].weight.requires_grad_(False)
    assert [id(p) for p in select_parameters(enc, "all")] == [id(enc.net[2].weight)]


def test_ge_noise_std_matches_the_unscaled_gradient_std():
    gen = torch.Generator().manual_seed(0)
    g = 5.0 + 0.3 * torch.randn(400, 500, generator=gen)  # std 0.3, far from its RMS (~5)
    original = g.clone()
    torch.manual_seed(1)
    modulate_gradients([g], torch.tensor(0.25), ge_scale=1.0)
    noise = g - 0.25 * original
    assert noise.std().item() == pytest.approx(original.std().item(), rel=0.02)
    assert abs(noise.mean().item()) < 0.01


@pytest.mark.parametrize("ge_scale", [0.5, 2.0])
def test_ge_scale_multiplies_the_noise_std(ge_scale):
    gen = torch.Generator().manual_seed(0)
    g = 0.3 * torch.randn(200_000, generator=gen)
    original = g.clone()
    torch.manual_seed(2)
    modulate_gradients([g], torch.tensor(1.0), ge_scale=ge_scale)
    assert (g - original).std().item() == pytest.approx(ge_scale * 0.3, rel=0.02)


def test_zero_ge_scale_adds_no_noise():
    g = torch.randn(1000)
    original = g.clone()
    modulate_gradients([g], torch.tensor(0.5), ge_scale=0.0)
    assert torch.equal(g, original * 0.5)


def test_ogm_ge_adds_noise_to_every_modality_but_not_the_head():
    model = conv_model()
    ogm = OGM(alpha=0.8, ge=True)
    ogm.setup(model, 3)
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.1
    before = grads_of(model)
    ogm.after_backward(ctx_for(model, rho=(2.0, 0.5)))  # audio dominant (k < 1), visual weak (k = 1)
    for m, k in (("audio", 1 - math.tanh(1.6)), ("visual", 1.0)):
        noise = torch.cat(
            [
                (p.grad - k * before[n]).flatten()
                for n, p in model.named_parameters()
                if n.startswith(f"encoders.{m}.") and p.dim() == 4
            ]
        )
        assert noise.std().item() == pytest.approx(0.1, rel=0.1), m  # the unscaled gradients' std
    for n, p in model.named_parameters():
        if p.dim() != 4 or n.startswith("head."):  # BN tensors and the head are not modulated
            assert torch.equal(p.grad, before[n]), n


@pytest.mark.parametrize(
    "window,active",
    [
        (dict(start=2, end=4), {1: False, 2: True, 3: True, 4: True, 5: False}),
        (dict(start=0, end=None, warmup_epochs=3), {0: False, 2: False, 3: True, 100: True}),
        (dict(start=0, end=50, warmup_epochs=6), {5: False, 6: True, 50: True, 51: False}),
    ],
)
def test_ogm_acts_only_inside_its_inclusive_window(window, active):
    model = mlp_model()
    ogm = OGM(alpha=0.8, ge=False, scope="all", **window)
    ogm.setup(model, 3)
    weight = model.encoders["audio"].net[0].weight
    for epoch, on in active.items():
        fill_grads(model)
        ctx = ctx_for(model, epoch=epoch, rho=(2.0, 0.5))
        ogm.after_backward(ctx)
        expected = 1 - math.tanh(1.6) if on else 1.0
        assert_close(weight.grad, torch.full_like(weight, expected), msg=f"epoch {epoch}")
        assert ctx.metrics["k_audio"].item() == pytest.approx(expected, rel=1e-6)


# --- §4 OPM ------------------------------------------------------------------------------------------------------
def test_opm_drop_probs_by_hand():
    rho = torch.tensor([0.5, 1.0, 1.5, 3.0])
    q = opm_drop_probs(rho, q_base=0.5, lam=0.5)
    expected = [0.0, 0.0, 0.5 * (1 + 0.5 * math.tanh(0.5)), 0.5 * (1 + 0.5 * math.tanh(2.0))]
    assert_close(q, torch.tensor(expected))


def test_opm_drop_probs_official_defaults_stay_in_range():
    rho = torch.linspace(1.0001, 5.0, 200)
    q = opm_drop_probs(rho, 0.5, 0.5)
    assert (q >= 0.5).all() and (q < 0.75).all()
    weak = opm_drop_probs(torch.linspace(0.0, 1.0, 50), 0.5, 0.5)
    assert (weak == 0).all()  # the weak modality is never dropped


def test_opm_drop_probs_are_clipped_to_one():
    q = opm_drop_probs(torch.tensor([3.0, 0.3]), q_base=0.9, lam=0.5)  # 0.9 * (1 + 0.5 tanh 2) > 1
    assert_close(q, torch.tensor([1.0, 0.0]))


def test_drop_features_keep_rates_match_one_minus_q():
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    feats = {"a": torch.ones(n, 2), "b": torch.ones(n, 3), "c": torch.ones(n, 1)}
    q = torch.tensor([0.3, 0.0, 0.8])
    out, keep = drop_features(feats, q, "none", generator=gen)
    rate = keep.float().mean(0)
    assert rate[0].item() == pytest.approx(0.7, abs=0.015)
    assert rate[1].item() == 1.0  # q = 0 never drops
    assert rate[2].item() == pytest.approx(0.2, abs=0.015)
    for i, m in enumerate(feats):
        rows_alive = out[m].abs().sum(1) > 0
        assert torch.equal(rows_alive, keep[:, i])  # a dropped sample loses its whole feature vector


def test_global_rescale_uses_width_weighted_theta():
    # d = [4, 12], q = [0.6, 0]: theta = 4 * 0.6 / 16 = 0.15 -> every kept feature x 1 / 0.85
    gen = torch.Generator().manual_seed(0)
    feats = {"a": torch.ones(64, 4), "b": torch.ones(64, 12)}
    out, keep = drop_features(feats, torch.tensor([0.6, 0.0]), "global", generator=gen)
    assert keep[:, 0].any() and not keep[:, 0].all()
    assert_close(out["a"][keep[:, 0]], torch.full((int(keep[:, 0].sum()), 4), 1 / 0.85))
    assert_close(out["b"], torch.full((64, 12), 1 / 0.85))
    assert_close(
        rescale_factors(torch.tensor([0.5, 0.25]), torch.tensor([8.0, 24.0]), "global"),
        torch.full((2,), 1 / (1 - (4 + 6) / 32)),
    )


def test_per_modality_and_no_rescale():
    gen = torch.Generator().manual_seed(0)
    feats = {"a": torch.ones(64, 4), "b": torch.ones(64, 12)}
    out, keep = drop_features(feats, torch.tensor([0.6, 0.0]), "per_modality", generator=gen)
    assert_close(out["a"][keep[:, 0]], torch.full((int(keep[:, 0].sum()), 4), 1 / 0.4))
    assert_close(out["b"], torch.ones(64, 12))
    out, keep = drop_features(feats, torch.tensor([0.6, 0.0]), "none", generator=gen)
    assert set(out["a"].unique().tolist()) == {0.0, 1.0}


def opm_ctx(epoch=0, rho=(2.0, 0.5), n=64, **kw):
    feats = {"audio": 1 + torch.rand(n, 4), "visual": 1 + torch.rand(n, 6)}  # no zero entries
    return ctx_for(nn.Identity(), epoch=epoch, rho=rho, features=feats, **kw)


def test_opm_drops_only_the_dominant_modality_and_rescales_globally():
    torch.manual_seed(0)
    opm = OPM(p_exe=1.0)
    ctx = opm_ctx(rho=(2.0, 0.5))
    original = dict(ctx.features)
    opm.on_features(ctx)
    q = 0.5 * (1 + 0.5 * math.tanh(1.0))
    theta = 4 * q / 10
    assert ctx.metrics["q_audio"].item() == pytest.approx(q, rel=1e-6) and ctx.metrics["q_visual"].item() == 0
    kept = ctx.features["audio"].abs().sum(1) > 0
    assert 0 < kept.sum() < 64
    assert_close(ctx.features["audio"][kept], original["audio"][kept] / (1 - theta))
    assert_close(ctx.features["visual"], original["visual"] / (1 - theta))
    assert_close(ctx.sample_weight, torch.ones(64))  # visual always survives


def test_opm_gives_zero_weight_to_samples_with_every_modality_dropped():
    torch.manual_seed(0)
    opm = OPM(q_base=0.5, lam=0.0, p_exe=1.0, rescale="none")
    ctx = opm_ctx(rho=(2.0, 2.0), n=400)  # both "dominant": possible only if the options change
    ctx.sample_weight = torch.full((400,), 0.5)
    opm.on_features(ctx)
    alive = (ctx.features["audio"].abs().sum(1) > 0) | (ctx.features["visual"].abs().sum(1) > 0)
    assert (~alive).any() and alive.any()
    assert_close(ctx.sample_weight, 0.5 * alive.float())


def test_opm_execution_probability():
    torch.manual_seed(0)
    opm = OPM(p_exe=0.7, rescale="none")
    feats = opm_ctx(n=2).features
    executed = 0
    for _ in range(400):
        ctx = ctx_for(None, rho=(2.0, 0.5), features=feats)
        opm.on_features(ctx)
        ran = ctx.features is not feats  # an executed drop replaces the feature dict
        executed += ran
        if not ran:
            assert ctx.sample_weight is None and float(ctx.metrics["drop_audio"]) == 0.0
    assert executed / 400 == pytest.approx(0.7, abs=0.07)  # 3 standard errors


def test_opm_with_zero_execution_probability_never_drops():
    opm = OPM(p_exe=0.0)
    ctx = opm_ctx()
    before = dict(ctx.features)
    opm.on_features(ctx)
    assert all(ctx.features[m] is before[m] for m in AV) and ctx.sample_weight is None


def test_opm_previous_q_source_uses_the_last_steps_rho():
    torch.manual_seed(0)
    opm = OPM(p_exe=1.0, rescale="none", q_source="previous")
    first = opm_ctx(rho=(3.0, 1 / 3))
    before = dict(first.features)
    opm.on_features(first)
    assert all(first.features[m] is before[m] for m in AV)  # no previous step: nothing dropped
    assert first.metrics["q_audio"].item() == 0 and first.metrics["q_visual"].item() == 0
    second = opm_ctx(rho=(0.5, 2.0))  # now visual dominates, but q comes from the first step
    before = dict(second.features)
    opm.on_features(second)
    assert second.metrics["q_audio"].item() == pytest.approx(opm_drop_probs(torch.tensor(3.0), 0.5, 0.5).item())
    assert second.metrics["q_visual"].item() == 0
    assert torch.equal(second.features["visual"], before["visual"])
    assert (second.features["audio"].abs().sum(1) == 0).any()


def test_opm_current_q_source_uses_this_steps_rho():
    torch.manual_seed(0)
    opm = OPM(p_exe=1.0, rescale="none", q_source="current")
    opm.on_features(opm_ctx(rho=(3.0, 1 / 3)))
    ctx = opm_ctx(rho=(0.5, 2.0))
    before = dict(ctx.features)
    opm.on_features(ctx)
    assert torch.equal(ctx.features["audio"], before["audio"])
    assert (ctx.features["visual"].abs().sum(1) == 0).any()


@pytest.mark.parametrize(
    "window,active",
    [
        (dict(start=2, end=3), {1: False, 2: True, 3: True, 4: False}),
        (dict(warmup_epochs=6), {0: False, 5: False, 6: True}),
    ],
)
def test_opm_does_nothing_outside_its_window(window, active):
    opm = OPM(p_exe=1.0, q_base=1.0, lam=0.0, **window)  # q = 1 for the dominant modality: always dropped
    for epoch, on in active.items():
        ctx = opm_ctx(epoch=epoch)
        before = dict(ctx.features)
        opm.on_features(ctx)
        dropped = bool((ctx.features["audio"] == 0).all())
        assert dropped == on, f"epoch {epoch}"
        if not on:
            assert ctx.features["audio"] is before["audio"] and ctx.sample_weight is None
            assert ctx.metrics["q_audio"].item() == 0


def test_opm_ogm_shares_one_rho_for_q_and_k():
    torch.manual_seed(0)
    model = mlp_model()
    method = OPMOGM(opm=OPM(p_exe=1.0, rescale="none"), ogm=OGM(alpha=0.8, ge=False, scope="all"))
    method.setup(model, 3)
    ctx = ctx_for(model, rho=(2.0, 0.5), features={"audio": torch.ones(64, 4), "visual": torch.ones(64, 4)})
    method.on_features(ctx)
    assert (ctx.features["audio"].sum(1) == 0).any() and (ctx.features["visual"] == 1).all()
    fill_grads(model)
    method.after_backward(ctx)
    assert_close(
        model.encoders["audio"].net[0].weight.grad,
        torch.full_like(model.encoders["audio"].net[0].weight, 1 - math.tanh(1.6)),
    )
    assert ctx.metrics["q_audio"] > 0 and ctx.metrics["k_audio"] < 1


# --- §6 baselines -------------------------------------------------------------------------------------------------
def test_modality_dropout_rate_and_other_modality_untouched():
    torch.manual_seed(0)
    md = ModalityDropout(modality="visual", p=0.3)
    md.setup(mlp_model(), 3)
    ctx = opm_ctx(n=20_000)
    before = dict(ctx.features)
    md.on_features(ctx)
    dropped = (ctx.features["visual"] == 0).all(1)
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert torch.equal(ctx.features["visual"][~dropped], before["visual"][~dropped])  # no rescale by default
    assert ctx.features["audio"] is before["audio"]


def test_modality_dropout_rescale():
    torch.manual_seed(0)
    md = ModalityDropout(modality="audio", p=0.5, rescale=True)
    ctx = opm_ctx(n=200)
    before = dict(ctx.features)
    md.on_features(ctx)
    kept = (ctx.features["audio"] != 0).all(1)
    assert kept.any() and not kept.all()
    assert_close(ctx.features["audio"][kept], 2 * before["audio"][kept])


def test_modality_dropout_rejects_an_unknown_modality():
    with pytest.raises(ValueError, match="depth"):
        ModalityDropout(modality="depth").setup(mlp_model(), 3)


class ScriptedBlending(GradientBlending):
    """Gradient-Blending whose held-out and train losses are given, not measured."""

    def __init__(self, losses, **kw):
        super().__init__(**kw)
        self.scripted = iter(losses)

    def _losses(self, ctx, split):
        values, got_split = next(self.scripted)
        assert got_split == split
        return torch.tensor(values, dtype=torch.float64)


def test_gradient_blending_weight_update_by_hand():
    # heads [fused, audio, visual]
    # start:  train [1, 1, 1],        val [1.2, 1.2, 1.2]
    # epoch:  train [0.5, 0.6, 0.9],  val [1.0, 1.1, 1.15]
    # G = val drop = [0.2, 0.1, 0.05];  O = gap change = [0.5 - 0.2, 0.5 - 0.2, 0.25 - 0.2] = [0.3, 0.3, 0.05]
    # G / O^2 = [20/9, 10/9, 20] -> normalised [2/21, 1/21, 18/21]
    gb = ScriptedBlending(
        [([1, 1, 1], "train"), ([1.2, 1.2, 1.2], "val"), ([0.5, 0.6, 0.9], "train"), ([1.0, 1.1, 1.15], "val")],
        super_epoch=1,
    )
    model = mlp_model()
    gb.setup(model, 3)
    assert_close(gb.weights, torch.full((3,), 1 / 3))
    ctx = ctx_for(model)
    gb.train_start(ctx)
    gb.epoch_end(ctx)
    assert_close(
        gb.weights.double(), torch.tensor([2 / 21, 1 / 21, 18 / 21], dtype=torch.float64), rtol=1e-5, atol=1e-7
    )


def test_gradient_blending_waits_for_its_super_epoch_and_clamps_negative_gains():
    # second estimate: the fused head's val loss rises (gain clamped to 0 -> weight 0)
    # G = [0, 0.1, 0.1]; O = [(1.3-0.5)-(1.2-1), (1.1-0.6)-0.2, (1.1-0.8)-0.2] = [0.6, 0.3, 0.1]
    # G / O^2 = [0, 10/9, 10] -> [0, 1/10, 9/10]
    gb = ScriptedBlending(
        [([1, 1, 1], "train"), ([1.2, 1.2, 1.2], "val"), ([0.5, 0.6, 0.8], "train"), ([1.3, 1.1, 1.1], "val")],
        super_epoch=2,
    )
    model = mlp_model()
    gb.setup(model, 3)
    gb.train_start(ctx_for(model))
    gb.epoch_end(ctx_for(model, epoch=0))  # (0 + 1) % 2 != 0: no estimate, no loss measured
    assert_close(gb.weights, torch.full((3,), 1 / 3))
    gb.epoch_end(ctx_for(model, epoch=1))
    assert_close(gb.weights.double(), torch.tensor([0.0, 0.1, 0.9], dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_gradient_blending_measures_mean_losses_of_each_head():
    torch.manual_seed(0)
    model = mlp_model()
    gb = GradientBlending(max_batches=None)
    gb.setup(model, 3)
    batches = [
        ({"audio": torch.randn(4, 5), "visual": torch.randn(4, 7)}, torch.tensor([0, 1, 2, 0])),
        ({"audio": torch.randn(2, 5), "visual": torch.randn(2, 7)}, torch.tensor([2, 2])),
    ]
    ctx = ctx_for(model, batches=lambda split, limit: iter(batches))
    model.train()
    losses = gb._losses(ctx, "val")
    assert model.training  # mode restored
    inputs = {m: torch.cat([b[0][m] for b in batches]) for m in AV}
    labels = torch.cat([b[1] for b in batches])
    model.eval()
    with torch.no_grad():
        feats = model.encode(inputs)
        expected = [F.cross_entropy(model.head(feats), labels)]
        expected += [F.cross_entropy(gb.aux[m](feats[m]), labels) for m in AV]
    assert_close(losses, torch.stack(expected))


def test_gradient_blending_weights_the_losses():
    torch.manual_seed(0)
    model = mlp_model()
    gb = GradientBlending()
    gb.setup(model, 3)
    gb.weights = torch.tensor([0.5, 0.2, 0.3])
    feats = {"audio": torch.randn(4, 4), "visual": torch.randn(4, 4)}
    labels = torch.tensor([0, 1, 2, 1])
    ctx = ctx_for(model, features=feats, labels=labels)
    gb.after_forward(ctx)
    assert float(ctx.loss_weight) == pytest.approx(0.5)
    for m, w in zip(AV, (0.2, 0.3)):
        assert_close(ctx.extra_losses[f"gb_{m}"], w * F.cross_entropy(gb.aux[m](feats[m]), labels))


# --- §1 uni-modal estimators of the fusion heads ------------------------------------------------------------------
def feats_for(dims, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, d, generator=gen, dtype=torch.float64) for m, d in dims.items()}


def test_concat_natural_estimator_is_the_weight_slice_plus_bias_over_m():
    dims = {"audio": 3, "visual": 4, "sensor": 2}
    head = ConcatFusion(dims, num_classes=3).double()
    with torch.no_grad():
        head.fc.bias.copy_(torch.tensor([0.3, -0.6, 0.9]))
    feats = feats_for(dims)
    z = head.unimodal_logits(feats, "natural")
    w, b = head.fc.weight, head.fc.bias
    cols = {"audio": slice(0, 3), "visual": slice(3, 7), "sensor": slice(7, 9)}
    for m in dims:
        assert_close(z[m], feats[m] @ w[:, cols[m]].T + b / 3, rtol=0, atol=1e-12)
    # the uni-modal logits add up to the fused logits
    assert_close(sum(z.values()), head(feats), rtol=0, atol=1e-12)
    # zero-out keeps the whole bias: z_zero - z_natural = b (1 - 1/M)
    zero = head.unimodal_logits(feats, "zero_out")
    for m in dims:
        assert_close(zero[m] - z[m], (b * 2 / 3).expand_as(z[m]), rtol=0, atol=1e-12)


def test_sum_natural_estimator_is_the_branch():
    dims = {"audio": 3, "visual": 4}
    head = SumFusion(dims, num_classes=3).double()
    feats = feats_for(dims)
    z = head.unimodal_logits(feats)
    for m in dims:
        assert_close(z[m], head.fc[m](feats[m]))
    assert_close(sum(z.values()), head(feats))


@pytest.mark.parametrize("cls", [FiLMFusion, GatedFusion])
def test_film_and_gated_natural_estimator_is_the_branch(cls):
    dims = {"audio": 3, "visual": 4}
    head = cls(dims, num_classes=3).double()
    feats = feats_for(dims)
    z = head.unimodal_logits(feats, "natural")
    for m in dims:
        assert_close(z[m], head.branch[m](feats[m]))


@pytest.mark.parametrize(
    "cls,dims",
    [
        (ConcatFusion, {"audio": 3, "visual": 4}),
        (ConcatFusion, {"audio": 3, "visual": 4, "sensor": 2}),
        (SumFusion, {"audio": 3, "visual": 4, "sensor": 2}),
        (FiLMFusion, {"audio": 3, "visual": 4}),
        (GatedFusion, {"audio": 3, "visual": 4}),
        (MLPFusion, {"audio": 3, "visual": 4}),
        (MLPFusion, {"audio": 3, "visual": 4, "sensor": 2}),
    ],
)
def test_zero_out_estimator_is_the_head_with_other_modalities_zeroed(cls, dims):
    torch.manual_seed(0)
    head = cls(dims, num_classes=3).double().eval()
    if cls is FiLMFusion:
        nn.init.normal_(head.gamma.weight)  # starts at zero; make the conditioning matter
    feats = feats_for(dims)
    z = head.unimodal_logits(feats, "zero_out")
    assert list(z) == list(dims)
    for m in dims:
        alone = {k: (v if k == m else torch.zeros_like(v)) for k, v in feats.items()}
        assert_close(z[m], head(alone))


def test_mlp_natural_estimator_is_unavailable_and_names_the_fix():
    dims = {"audio": 3, "visual": 4}
    head = MLPFusion(dims, num_classes=3)
    with pytest.raises(EstimatorUnavailable, match="discrepancy.estimator=zero_out"):
        head.unimodal_logits({m: torch.randn(2, d) for m, d in dims.items()}, "natural")


@pytest.mark.parametrize("cls", [FiLMFusion, GatedFusion])
def test_two_modality_heads_reject_three_modalities(cls):
    with pytest.raises(ValueError, match="exactly two"):
        cls({"audio": 3, "visual": 4, "sensor": 2}, num_classes=3)


@pytest.mark.parametrize("cls", [FiLMFusion, GatedFusion])
def test_two_modality_heads_reject_an_unknown_condition(cls):
    with pytest.raises(ValueError, match="depth"):
        cls({"audio": 3, "visual": 4}, num_classes=3, condition="depth")


def test_film_condition_chooses_the_modulating_modality():
    dims = {"audio": 3, "visual": 3}
    head = FiLMFusion(dims, num_classes=2, condition="visual").double()
    nn.init.normal_(head.gamma.weight)
    feats = feats_for(dims)
    expected = (1 + head.gamma(feats["visual"])) * head.branch["audio"](feats["audio"]) + head.branch["visual"](
        feats["visual"]
    )
    assert_close(head(feats), expected)
