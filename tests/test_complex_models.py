"""Mid-fusion models (MMTM, CentralNet, attention fusion), OPM and OGM on them, Greedy and the conditional
utilisation rate: shapes with frames folded into the batch, what each method touches, hand-computed estimates."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.config import compose
from onthefly.models import build_model
from onthefly.models.centralnet import CentralNetHead
from onthefly.models.encoders import ResNet18
from onthefly.models.mmtm import MMTMUnit
from onthefly.models.utilisation import conditional_utilisation, utilisation_rates
from onthefly.modulation.base import Modulation, StepContext
from onthefly.modulation.discrepancy import discrepancy
from onthefly.modulation.greedy import Greedy, balance_difference, learning_speed
from onthefly.modulation.ogm import OGM
from onthefly.modulation.opm import OPM

FUSIONS = ["mmtm", "centralnet", "xattn", "vatt_ma"]
MODS = ["audio", "visual"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(fusion: str, *overrides: str, num_classes: int = 5):
    cfg = compose([f"fusion={fusion}", "backbone=resnet18_small", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, MODS, num_classes)


def tiny_inputs(batch: int = 3, frames: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "audio": torch.randn(batch, 1, 48, 40, generator=g),
        "visual": torch.randn(batch, frames, 3, 32, 32, generator=g),
    }


def ctx_for(model, inputs, labels, **fields) -> StepContext:
    return StepContext(
        epoch=0, step=0, global_step=0, model=model, modalities=MODS, inputs=inputs, labels=labels, **fields
    )


# --- the ResNet18 stage API ------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [None, 1, 3])
def test_resnet18_stages_reproduce_the_plain_forward(frames):
    torch.manual_seed(0)
    enc = ResNet18(3, width=8).eval()
    x = torch.randn(2, 3, 32, 32) if frames is None else torch.randn(2, frames, 3, 32, 32)
    h, t = enc.fold(x)
    assert t == (frames or 1)
    for i in range(5):
        h = enc.stage(i, h)
    assert enc.stage_channels == (8, 16, 32, 64)
    torch.testing.assert_close(enc.pool(h, t), enc(x))
    # parameter names are the plain model's (checkpoints stay valid)
    assert all(k.startswith(("stem.", "layers.")) for k in enc.state_dict())


# --- shapes with frames folded into the batch ----------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_model_pairs_each_clip_with_its_own_frames(fusion, frames):
    """In eval mode every sample's output must equal the output of that sample alone: the squeeze/taps/tokens of a
    clip are built from its own T frames (the released MMTMs pair B audio rows with B·T visual rows)."""
    model = tiny_model(fusion).eval()
    x = tiny_inputs(batch=3, frames=frames)
    feats = model.encode(x)
    width = model.feature_dims
    for m in MODS:
        assert feats[m].shape[0] == 3 and feats[m].shape[-1] == width[m]
    out = model(x)
    assert out.shape == (3, 5)
    for i in range(3):
        alone = model({m: v[i : i + 1] for m, v in x.items()})
        torch.testing.assert_close(alone, out[i : i + 1], rtol=1e-4, atol=1e-5)


def test_mmtm_squeezes_each_clip_over_its_frames_and_repeats_the_gate():
    model = tiny_model("mmtm", "fusion.interaction.levels=[4]").eval()
    x = tiny_inputs(batch=2, frames=3)
    enc = model.encoders
    seen = {}
    unit = model.interaction.units["4"]
    original = unit.code

    def spy(squeezes):
        seen.update({m: s.detach().clone() for m, s in squeezes.items()})
        return original(squeezes)

    unit.code = spy
    feats = model.encode(x)
    # recompute the visual layer4 map by hand: [B·T, C, H, W] -> per clip mean over T, H, W
    h, t = enc["visual"].fold(x["visual"])
    for i in range(5):
        h = enc["visual"].stage(i, h)
    per_clip = h.view(2, 3, *h.shape[1:]).mean(dim=(1, 3, 4))
    torch.testing.assert_close(seen["visual"], per_clip)
    gate = unit.gate("visual", original(seen))
    expected = (h * gate.repeat_interleave(3, dim=0)[:, :, None, None]).mean(dim=(2, 3)).view(2, 3, -1).mean(1)
    torch.testing.assert_close(feats["visual"], expected)


def test_staged_fusions_refuse_encoders_without_stages():
    from onthefly.config import ConfigError

    cfg = compose(["fusion=mmtm", "dataset=synth_av3"])
    with pytest.raises(ConfigError, match="sensor.*MLPEncoder.*backbone=resnet18"):
        build_model(cfg, ["audio", "sensor"], 4)
    with pytest.raises(ConfigError, match="only"):
        build_model(compose(["fusion=xattn"]), ["audio"], 4)


def test_parameter_counts_match_the_closed_forms():
    cfg = compose(["fusion=mmtm", "backbone=resnet18"])
    model = build_model(cfg, MODS, 6)
    per_unit = [sum(p.numel() for p in u.parameters()) for u in model.interaction.units.values()]
    assert per_unit == [4 * c * c + 3 * c for c in (128, 256, 512)] == [65920, 262912, 1050112]
    central = build_model(compose(["fusion=centralnet", "backbone=resnet18"]), MODS, 6).head
    blocks = sum(p.numel() for p in central.blocks.parameters())
    assert blocks == (64 * 128 + 128 + 2 * 128) + (128 * 256 + 256 + 2 * 256) + (256 * 512 + 512 + 2 * 512)
    assert central.alpha.numel() + central.alpha_central.numel() == 11


# --- OPM inside MMTM --------------------------------------------------------------------------------------------
def test_opm_drop_inside_mmtm_reaches_the_squeeze():
    """A sample whose audio is dropped: its audio squeeze is replaced by the running mean at every MMTM, so the
    audio input no longer changes the visual stream (perturb it: z_v does not move); a kept sample's does."""
    model = tiny_model("mmtm")
    x = tiny_inputs(batch=3, frames=2)
    model.train()
    model.encode(x, ctx_for(model, x, torch.zeros(3, dtype=torch.long)))  # one training forward: running means
    model.eval()
    keep = torch.tensor([[False, True], [True, True], [True, True]])
    ctx = ctx_for(model, x, torch.zeros(3, dtype=torch.long), keep=keep)
    base = model.encode(x, ctx)
    bumped = {**x, "audio": x["audio"].clone()}
    bumped["audio"][0] += 3.0
    bumped["audio"][1] += 3.0
    moved = model.encode(bumped, ctx)
    torch.testing.assert_close(moved["visual"][0], base["visual"][0])  # dropped: no influence
    assert not torch.allclose(moved["visual"][1], base["visual"][1])  # kept: still steers the visual gates
    # without the keep mask the dropped sample steers the visual stream too
    plain, plain_moved = model.encode(x), model.encode(bumped)
    assert not torch.allclose(plain["visual"][0], plain_moved["visual"][0])


def test_opm_on_mmtm_draws_masks_before_the_forward_from_the_previous_rho():
    model = tiny_model("mmtm")
    opm = OPM(q_base=1.0, lam=0.0, p_exe=1.0)
    opm.setup(model, 5)
    assert opm.in_forward
    labels = torch.zeros(4, dtype=torch.long)
    ctx = ctx_for(model, None, labels)
    opm.before_forward(ctx)
    assert ctx.keep is None  # no previous ρ at the first step
    ctx.features = {m: torch.ones(4, 3) for m in MODS}
    ctx.rho = torch.tensor([2.0, 0.5])
    opm.on_features(ctx)
    torch.testing.assert_close(opm.prev_rho, ctx.rho)
    ctx2 = ctx_for(model, None, labels)
    opm.before_forward(ctx2)  # q from the stored ρ: audio dominant, q_audio = 1, q_visual = 0
    assert ctx2.keep.tolist() == [[False, True]] * 4
    ctx2.features = {m: torch.ones(4, 3) for m in MODS}
    ctx2.rho = torch.tensor([0.5, 2.0])
    opm.on_features(ctx2)  # the same masks at the head (global rescale 1 / (1 - θ), θ = 0.5)
    assert torch.equal(ctx2.features["audio"], torch.zeros(4, 3))
    torch.testing.assert_close(ctx2.features["visual"], torch.full((4, 3), 2.0))


def test_scores_leave_out_samples_a_method_altered():
    logits = {"audio": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0], [0.0, 3.0]])}
    labels = torch.tensor([0, 1])
    s, rho = discrepancy(logits, labels, weight=torch.tensor([True, False]))
    pa, pv = 1 / (1 + math.exp(-2)), 0.5  # sample 0 only
    torch.testing.assert_close(s, torch.tensor([pa, pv]))
    torch.testing.assert_close(rho, torch.tensor([pa / pv, pv / pa]), rtol=1e-6, atol=1e-6)


class KeepFirstHalf(Modulation):
    """A toy method (named by `modulation._target_`): marks the second half of each batch as altered through
    ctx.keep and checks, in on_features, that the trainer's scores cover the first half only."""

    needs_rho = True
    checked = 0

    def before_forward(self, ctx):
        keep = torch.ones(len(ctx.labels), len(ctx.modalities), dtype=torch.bool)
        keep[len(ctx.labels) // 2 :, 0] = False
        ctx.keep = keep

    def on_features(self, ctx):
        half = len(ctx.labels) // 2
        expected = discrepancy({m: z[:half] for m, z in ctx.unimodal.items()}, ctx.labels[:half])[0]
        torch.testing.assert_close(ctx.scores, expected)
        KeepFirstHalf.checked += 1


@pytest.mark.slow
def test_the_trainer_leaves_samples_altered_through_keep_out_of_the_scores(train_run):
    KeepFirstHalf.checked = 0
    train_run(f"modulation._target_={__name__}.KeepFirstHalf", "trainer.epochs=1")
    assert KeepFirstHalf.checked == 4  # every step of the epoch


# --- OGM: what it scales on each model ------------------------------------------------------------------------
def _grads(model, x, labels, ogm=None, rho=(3.0, 0.5)):
    """One forward/backward (eval mode: deterministic) with OGM's hooks; returns {param name: grad} after OGM."""
    model.zero_grad(set_to_none=True)
    ctx = ctx_for(model, x, labels)
    ctx.features = model.encode(x, ctx)
    ctx.rho = torch.tensor(rho)
    if ogm is not None:
        ogm.on_features(ctx)
    ctx.logits = model.head(ctx.features)
    model.head.training_terms(ctx, _CE())
    loss = F.cross_entropy(ctx.logits, labels) + sum(ctx.extra_losses.values())
    loss.backward()
    if ogm is not None:
        ogm.after_backward(ctx)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _CE:
    def loss(self, outputs, labels, batch):
        return F.cross_entropy(outputs, labels, reduction="none")

    def class_logits(self, outputs):
        return outputs


K = 1 - math.tanh(0.5 * 3.0)  # OGM's k for α = 0.5 and ρ_audio = 3 (the _grads default)


def _ogm_grads(model, **options):
    """(gradients without OGM, gradients after OGM with ``options``) of one fixed batch, eval mode."""
    x, labels = tiny_inputs(batch=4, frames=2), torch.tensor([0, 1, 2, 3])
    base = _grads(model, x, labels)
    ogm = OGM(alpha=0.5, ge=False, end=None, **options)
    ogm.setup(model, 5)
    return base, _grads(model, x, labels, ogm), ogm


@pytest.mark.parametrize("fusion", ["mmtm", "centralnet", "xattn"])
def test_ogm_scales_only_the_dominant_encoders_conv_gradients(fusion):
    model = tiny_model(fusion, *(["fusion.head.dropout=0"] if fusion == "xattn" else [])).eval()
    base, after, ogm = _ogm_grads(model)
    assert ogm.level.value == "parameter"
    k = K
    scaled = {id(p) for p in model.encoders["audio"].parameters() if p.dim() == 4}
    for name, p in model.named_parameters():
        if name not in base:
            continue
        factor = k if id(p) in scaled else 1.0
        torch.testing.assert_close(after[name], factor * base[name], msg=name)
    assert any(n.startswith(("interaction.", "head.")) for n in base)


def test_ogm_fusion_params_option_also_scales_mmtm_excitation():
    """The squeeze layers (shared) are never scaled; the excitation of m with fusion_params=interaction, and
    m's branch classifier too with all."""
    model = tiny_model("mmtm").eval()
    k = K
    for option in ("interaction", "all"):
        base, after, _ = _ogm_grads(model, fusion_params=option)
        for name in base:
            own = name.startswith("interaction.units.") and ".excite.audio." in name
            own = own or (option == "all" and name.startswith("head.branch.audio."))
            conv = name.startswith("encoders.audio.") and base[name].dim() == 4
            torch.testing.assert_close(after[name], (k if own or conv else 1.0) * base[name], msg=f"{option} {name}")


def test_ogm_on_shared_parameters_scales_the_feature_gradient():
    """vatt_ma shares its transformer: OGM hooks ∂L/∂z_audio, so every audio-only parameter (the whole encoder, its
    projection and CLS) gets exactly k·g while the visual path and the head are untouched."""
    model = tiny_model("vatt_ma", "fusion.interaction.dropout=0").eval()
    base, after, ogm = _ogm_grads(model)
    assert ogm.level.value == "feature"
    k = K
    for name in base:
        audio_only = name.startswith("encoders.audio.") or any(
            name.startswith(f"interaction.{part}")
            for part in ("proj.audio.", "norm.audio.", "type_embedding.audio", "cls.audio")
        )
        if audio_only:
            torch.testing.assert_close(after[name], k * base[name], msg=name)
        elif name.startswith(("encoders.visual.", "head.")) or ".visual" in name:
            torch.testing.assert_close(after[name], base[name], msg=name)


def test_ogm_feature_level_on_centralnet_scales_only_the_central_path():
    """level=feature on CentralNet (the fused-path option): the audio encoder's gradient becomes k·g_central +
    g_branch (the branch classifier's loss is not modulated)."""
    model = tiny_model("centralnet").eval()
    x, labels = tiny_inputs(batch=4, frames=2), torch.tensor([0, 1, 2, 3])
    params = [p for p in model.encoders["audio"].parameters()]
    feats = model.encode(x)
    central = F.cross_entropy(model.head(feats), labels)
    branch = F.cross_entropy(model.head.branch_logits(feats)["audio"], labels)
    g_central = torch.autograd.grad(central, params, retain_graph=True)
    g_branch = torch.autograd.grad(branch, params)
    ogm = OGM(alpha=0.5, ge=False, end=None, level="feature")
    ogm.setup(model, 5)
    after = _grads(model, x, labels, ogm)
    k = 1 - math.tanh(0.5 * 3.0)
    names = [n for n, _ in model.encoders["audio"].named_parameters()]
    for n, gc, gb in zip(names, g_central, g_branch):
        torch.testing.assert_close(after[f"encoders.audio.{n}"], k * gc + gb, msg=n, rtol=1e-4, atol=1e-6)


def test_ogm_ge_noise_at_feature_level_uses_the_unscaled_std():
    from onthefly.modulation.ogm import modulate_gradients

    torch.manual_seed(0)
    g = torch.randn(1000)
    k = torch.tensor(0.25)
    a, b = (k * g).clone(), g.clone()
    torch.manual_seed(1)
    modulate_gradients([a], k, 1.0, scaled=True)
    torch.manual_seed(1)
    modulate_gradients([b], k, 1.0)
    torch.testing.assert_close(a, b)


# --- ρ on each model against hand-computed cases -----------------------------------------------------------------
def _manual_scores(logits, labels):
    return [sum(math.exp(z[y]) / sum(math.exp(v) for v in z) for z, y in zip(rows, labels)) for rows in logits]


def test_rho_of_late_average_is_each_branch_not_halved():
    model = tiny_model("mmtm", num_classes=2)
    head = model.head
    with torch.no_grad():
        for m in MODS:
            head.branch[m].weight.zero_()
            head.branch[m].bias.zero_()
        head.branch["audio"].weight[0, 0] = 2.0
        head.branch["visual"].weight[1, 0] = 1.0
    feats = {m: torch.zeros(2, head.feature_dims[m]) for m in MODS}
    feats["audio"][:, 0] = torch.tensor([1.0, 0.5])
    feats["visual"][:, 0] = torch.tensor([1.0, 1.0])
    labels = torch.tensor([0, 1])
    uni = head.unimodal_logits(feats, "natural")
    s, rho = discrepancy(uni, labels)
    sa, sv = _manual_scores([[[2.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]], [0, 1])
    torch.testing.assert_close(s, torch.tensor([sa, sv]))
    torch.testing.assert_close(rho, torch.tensor([sa / sv, sv / sa]))
    torch.testing.assert_close(head(feats), (uni["audio"] + uni["visual"]) / 2)


def test_rho_of_centralnet_reruns_the_central_net_with_the_other_taps_zeroed():
    head = CentralNetHead({"audio": 2, "visual": 2}, num_classes=2, tap_channels=[1, 1]).eval()
    with torch.no_grad():
        head.blocks[0].fc.weight.fill_(1.0)
        head.blocks[0].fc.bias.zero_()
        head.alpha.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))  # α_m^l: rows = levels, columns = audio, visual
        head.alpha_central.fill_(3.0)
        head.classifier.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.classifier.bias.zero_()
    eps = head.blocks[0].bn.eps
    bn = 1 / math.sqrt(1 + eps)  # fresh running statistics: mean 0, var 1

    def central(pa, pv):  # [p^1, p^2] per modality
        c1 = max(0.0, 1.0 * pa[0] + 2.0 * pv[0]) * bn
        c2 = 3.0 * c1 + 0.5 * pa[1] - 1.0 * pv[1]
        return [c2, -c2]

    a, v = [[1.0, 2.0], [0.5, -1.0]], [[0.3, 1.0], [2.0, 0.2]]
    feats = {
        "audio": torch.tensor(a),
        "visual": torch.tensor(v),
        "branch/audio": torch.zeros(2, 1),
        "branch/visual": torch.zeros(2, 1),
    }
    torch.testing.assert_close(head(feats), torch.tensor([central(x, y) for x, y in zip(a, v)]))
    uni = head.unimodal_logits(feats, "natural")
    expect_a = [central(x, [0.0, 0.0]) for x in a]
    expect_v = [central([0.0, 0.0], y) for y in v]
    torch.testing.assert_close(uni["audio"], torch.tensor(expect_a))
    torch.testing.assert_close(uni["visual"], torch.tensor(expect_v))
    labels = [0, 1]
    sa, sv = _manual_scores([expect_a, expect_v], labels)
    _, rho = discrepancy(uni, torch.tensor(labels))
    torch.testing.assert_close(rho, torch.tensor([sa / sv, sv / sa]))


def test_centralnet_estimate_passes_leave_the_running_statistics_alone():
    head = CentralNetHead({"audio": 3, "visual": 3}, num_classes=2, tap_channels=[1, 2]).train()
    feats = {
        "audio": torch.randn(4, 3),
        "visual": torch.randn(4, 3),
        "branch/audio": torch.randn(4, 2),
        "branch/visual": torch.randn(4, 2),
    }
    before = head.blocks[0].bn.running_mean.clone()
    head.unimodal_logits(feats, "natural")
    torch.testing.assert_close(head.blocks[0].bn.running_mean, before)
    head(feats)
    assert not torch.allclose(head.blocks[0].bn.running_mean, before)
    head({k: v[:1] for k, v in feats.items()})  # one training sample: the running statistics, no error


def test_rho_of_attention_fusion_masks_the_other_modality():
    """Zeroing a modality's tokens masks them: the fused output equals attending to the other modality alone, and
    that is the uni-modal estimate; ``absent=zeros`` keeps zero tokens in the sequence, which differs."""
    model = tiny_model("xattn", "fusion.head.dropout=0").eval()
    feats = model.encode(tiny_inputs(batch=2, frames=2))
    zeroed = {**feats, "visual": torch.zeros_like(feats["visual"])}
    alone = model.head.attend([feats["audio"]])
    torch.testing.assert_close(model.head(zeroed), alone, rtol=1e-5, atol=1e-6)
    uni = model.head.unimodal_logits(feats, "natural")
    torch.testing.assert_close(uni["audio"], alone)
    torch.testing.assert_close(model.head.unimodal_logits(feats, "zero_out")["audio"], alone, rtol=1e-5, atol=1e-6)
    model.head.absent = type(model.head.absent)("zeros")
    assert not torch.allclose(model.head(zeroed), alone)


def test_rho_of_shared_transformer_is_the_concat_estimate():
    model = tiny_model("vatt_ma", num_classes=2)
    head = model.head
    d = head.feature_dims["audio"]
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.bias.copy_(torch.tensor([0.4, -0.4]))
        head.fc.weight[0, 0] = 1.0  # audio column 0
        head.fc.weight[1, d] = 2.0  # visual column 0
    feats = {m: torch.zeros(2, d) for m in MODS}
    feats["audio"][:, 0] = torch.tensor([1.0, -1.0])
    feats["visual"][:, 0] = torch.tensor([0.5, 1.0])
    labels = torch.tensor([0, 1])
    zero_out = head.unimodal_logits(feats, "zero_out")  # the full bias with the other modality zeroed
    za = [[1.0 + 0.4, -0.4], [-1.0 + 0.4, -0.4]]
    zv = [[0.4, 1.0 - 0.4], [0.4, 2.0 - 0.4]]
    torch.testing.assert_close(zero_out["audio"], torch.tensor(za))
    torch.testing.assert_close(zero_out["visual"], torch.tensor(zv))
    sa, sv = _manual_scores([za, zv], [0, 1])
    torch.testing.assert_close(discrepancy(zero_out, labels)[1], torch.tensor([sa / sv, sv / sa]))


# --- Greedy ------------------------------------------------------------------------------------------------------
def test_learning_speed_and_balance_difference_by_hand():
    a, b = nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
    a.grad, b.grad = torch.tensor([0.3, 0.0]), torch.tensor([[0.0, 0.1], [0.2, 0.0]])
    c = nn.Parameter(torch.tensor([1.0]))  # no gradient: counts in the weight norm only
    mu = learning_speed([a, b, c])
    torch.testing.assert_close(mu, torch.tensor((0.09 + 0.01 + 0.04) / (25 + 9 + 1)))
    bdr, d = balance_difference(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 2.0]))
    torch.testing.assert_close(bdr, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(d, torch.tensor(1.0))


def _greedy_on(main, bypass, **options):
    g = Greedy(**options)
    g.modalities = list(MODS)
    g.main, g.bypass = main, bypass
    return g


def test_greedy_guided_curates_the_branch_whose_bypass_learns_faster():
    p = [nn.Parameter(torch.ones(4)) for _ in range(4)]
    for q, grad in zip(p, (0.1, 0.1, 1.0, 0.1)):  # main_a, main_v, bypass_a, bypass_v
        q.grad = torch.full((4,), grad)
    g = _greedy_on([[p[0]], [p[1]]], [[p[2]], [p[3]]], epsilon=0.5, window=2, starting_epoch=1)
    ctx = ctx_for(None, None, torch.zeros(1, dtype=torch.long))
    g.after_backward(ctx)  # locked: speeds summed, no curation
    assert g.left == 0
    torch.testing.assert_close(ctx.metrics["greedy_d_bdr"], torch.tensor(2.0))  # log10(100) - log10(1)
    g.epoch_start(StepContext(epoch=1, step=0, global_step=0, model=None, modalities=MODS))  # unlocks
    g.after_backward(ctx)
    assert (g.caring, g.left) == (0, 2)
    for _ in range(2):  # two curation steps of the audio branch, no speed measured
        c = ctx_for(None, None, torch.zeros(1, dtype=torch.long))
        g.before_forward(c)
        assert c.curation == "audio" and float(c.metrics["greedy_curate_audio"]) == 1.0
        g.after_backward(c)
    torch.testing.assert_close(g.speed_sums[1], torch.tensor([2 * 1.0, 2 * 0.01], dtype=torch.float64))
    c = ctx_for(None, None, torch.zeros(1, dtype=torch.long))
    g.before_forward(c)
    assert c.curation is None


def test_greedy_random_variant_draws_every_step_once_unlocked():
    g = _greedy_on([], [], variant="random", starting_epoch=0)
    g.unlocked = True
    torch.manual_seed(0)
    seen = []
    for _ in range(60):
        c = ctx_for(None, None, torch.zeros(1, dtype=torch.long))
        g.before_forward(c)
        seen.append(c.curation)
        g.after_backward(c)
    assert {None, "audio", "visual"} == set(seen[1:])


def test_gate_average_and_the_released_copy_slip():
    unit = MMTMUnit({"audio": 2, "visual": 2})
    gates = [
        {"audio": torch.tensor([[0.2, 0.4], [0.4, 0.6]]), "visual": torch.tensor([[0.9, 0.1], [0.7, 0.3]])},
        {"audio": torch.tensor([[0.6, 0.0]]), "visual": torch.tensor([[0.5, 0.5]])},
    ]
    for gt in gates:
        unit.update_gate_means(gt)
    torch.testing.assert_close(unit.gate_mean("audio"), torch.tensor([(0.3 + 0.6) / 2, (0.5 + 0.0) / 2]))
    torch.testing.assert_close(unit.gate_mean("visual"), torch.tensor([(0.8 + 0.5) / 2, (0.2 + 0.5) / 2]))
    slip = MMTMUnit({"audio": 2, "visual": 2})
    for gt in gates:
        slip.update_gate_means(gt, copy_slip=True)
    torch.testing.assert_close(slip.gate_mean("visual"), slip.gate_mean("audio"))


def test_curation_gates_the_curated_branch_with_its_average():
    """On a curation step of the audio branch, audio's gates at every MMTM are Ē_audio, so the audio feature no
    longer depends on the visual input."""
    model = tiny_model("mmtm")
    x = tiny_inputs(batch=2, frames=2)
    model.train()
    model.encode(x, ctx_for(model, x, torch.zeros(2, dtype=torch.long)))  # Ē from one training forward
    model.eval()
    ctx = ctx_for(model, x, torch.zeros(2, dtype=torch.long), curation="audio")
    bumped = {**x, "visual": x["visual"] + 2.0}
    torch.testing.assert_close(model.encode(bumped, ctx)["audio"], model.encode(x, ctx)["audio"])
    assert not torch.allclose(model.encode(bumped)["audio"], model.encode(x)["audio"])


def test_greedy_refuses_models_without_mmtm():
    from onthefly.config import ConfigError  # a setting error: one line on the command line

    model = tiny_model("centralnet")
    with pytest.raises(ConfigError, match="fusion=mmtm"):
        Greedy().setup(model, 5)
    model = build_model(compose(["fusion=concat"]), MODS, 5)
    with pytest.raises(ConfigError, match="no interaction module; use fusion=mmtm"):
        Greedy().setup(model, 5)


def test_greedy_groups_follow_the_model_structure():
    model = tiny_model("mmtm")
    g = Greedy()
    g.setup(model, 5)
    main_a = {id(p) for p in g.main[0]}
    assert {id(p) for p in model.encoders["audio"].parameters()} <= main_a
    assert {id(p) for p in model.head.branch["audio"].parameters()} <= main_a
    squeeze = {id(p) for u in model.interaction.units.values() for p in u.squeeze.parameters()}
    for i, m in enumerate(MODS):  # the shared squeeze layers count in both bypass groups
        bypass = {id(p) for p in g.bypass[i]}
        assert squeeze <= bypass
        assert {id(p) for u in model.interaction.units.values() for p in u.excite[m].parameters()} <= bypass


# --- conditional utilisation rate --------------------------------------------------------------------------------
def test_utilisation_rates_by_hand():
    out = utilisation_rates(MODS, {"audio": 0.8, "visual": 0.5}, {"audio": 0.4, "visual": 0.5})
    assert out == {"cur_visual_given_audio": 0.0, "cur_audio_given_visual": 0.5, "d_util": -0.5}
    assert math.isnan(
        utilisation_rates(MODS, {"audio": 0.0, "visual": 1.0}, {"audio": 0.0, "visual": 1.0})["cur_audio_given_visual"]
    )


def test_mean_replacement_utilisation_on_a_head_that_ignores_visual():
    model = build_model(compose(["fusion=concat"]), MODS, 3).eval()
    with torch.no_grad():
        d = model.head.feature_dims["audio"]
        model.head.fc.weight[:, d:] = 0.0  # the head reads audio only
    batches = [(tiny_inputs(batch=4, frames=1, seed=s), torch.tensor([0, 1, 2, 0])) for s in range(2)]
    out = conditional_utilisation(model, batches, batches)
    assert out["cur_visual_given_audio"] == 0.0
    assert set(out) == {"cur_visual_given_audio", "cur_audio_given_visual", "d_util"}


def test_mmtm_utilisation_isolates_each_stream():
    model = tiny_model("mmtm").eval()
    batches = [(tiny_inputs(batch=3, frames=2, seed=s), torch.tensor([0, 1, 2])) for s in range(2)]
    means = model.interaction.squeeze_means(model, batches)
    assert set(means) == {2, 3, 4} and means[4]["visual"].shape == (64,)
    x = batches[0][0]
    with model.interaction.isolated(means):
        a = model.encode(x)["audio"]
        moved = model.encode({**x, "visual": x["visual"] + 1.0})["audio"]
    torch.testing.assert_close(a, moved)
    out = conditional_utilisation(model, batches, batches)
    assert set(out) == {"cur_visual_given_audio", "cur_audio_given_visual", "d_util"}
    assert all(math.isfinite(v) or math.isnan(v) for v in out.values())


# --- composition with the presets and end-to-end runs -------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tpami2024/cremad", "cvpr2022/cremad", "tpami2024/kinetics_sounds"])
@pytest.mark.parametrize("fusion", ["mmtm", "centralnet", "xattn"])
def test_fusions_compose_with_the_presets(fusion, preset):
    cfg = compose([f"experiment={preset}", f"fusion={fusion}", "modulation=opm_ogm"])
    assert cfg.backbone.name == "resnet18" and "interaction" in cfg.fusion
    model = build_model(cfg, MODS, 6)  # the preset's full-width encoders
    assert model.encoders["audio"].stage_channels[-1] == 512
    size = cfg.dataset.image_size
    x = {"audio": torch.randn(1, 1, 257, 188), "visual": torch.randn(1, cfg.dataset.num_frames, 3, size, size)}
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["fusion=mmtm", "fusion.interaction.squeeze_momentum=1.5"],
            "fusion.interaction.squeeze_momentum=1.5: must be in",
        ),
        (["fusion=xattn", "fusion.head.dropout=1.0"], "fusion.head.dropout=1.0: must be in"),
        (["fusion=centralnet", "fusion.head.beta=-1"], "fusion.head.beta=-1.0: must be >= 0"),
        (["fusion=mmtm", "modulation=greedy", "modulation.window=0"], "modulation.window=0: must be >= 1"),
    ],
)
def test_mid_fusion_and_greedy_options_are_range_checked(overrides, message):
    from onthefly.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


METHODS = ["none", "ogm_ge", "opm", "opm_ogm"]
RUNS = [(f, m) for f in ["mmtm", "centralnet", "xattn"] for m in METHODS] + [("mmtm", "greedy"), ("vatt_ma", "ogm_ge")]


@pytest.mark.slow
@pytest.mark.parametrize("fusion,method", RUNS, ids=[f"{f}-{m}" for f, m in RUNS])
def test_debug_fast_run_per_model_and_method(train_run, fusion, method):
    from conftest import read_results

    extra = ["modulation.starting_epoch=0", "modulation.epsilon=0"] if method == "greedy" else []
    if fusion in ("xattn", "vatt_ma"):
        extra.append("fusion.interaction.dim=32")
    _, out = train_run(f"fusion={fusion}", f"modulation={method}", *extra)
    assert read_results(out)["status"] == "ok"
    steps = pd.read_csv(out / "steps.csv")
    expected = {
        "none": ["train/rho_audio"],
        "ogm_ge": ["train/k_audio"],
        "opm": ["train/q_audio", "train/drop_audio"],
        "opm_ogm": ["train/q_audio", "train/k_visual"],
        "greedy": ["train/greedy_d_bdr", "train/greedy_curating"],
    }[method]
    assert set(expected) <= set(steps.columns)
    if fusion == "mmtm":
        assert "train/mmtm4_gate_visual" in steps.columns
    if fusion == "centralnet":
        assert {"train/alpha1_audio", "train/branch_loss_visual"} <= set(steps.columns)
    if method == "greedy":
        assert steps["train/greedy_curating"].sum() > 0  # epsilon 0: every regular step after unlock curates


@pytest.mark.slow
def test_analyses_run_on_an_attention_fusion_run(train_run):
    """Token features ([N, T·H·W, d]) go through the probe (mean token) and the robustness test (zeroed = masked)."""
    from onthefly.analyse import analyse

    _, out = train_run("fusion=xattn", "fusion.interaction.dim=32", "modulation=opm")
    probe = analyse("probe", out)
    robust = analyse("robustness", out)
    assert set(MODS) <= set(probe) and set(MODS) <= set(robust["acc"])
    assert all(len(v) == len(robust["ratios"]) for v in robust["acc"].values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        ["fusion=mmtm", "modulation=opm_ogm"],
        ["fusion=mmtm", "modulation=greedy", "modulation.starting_epoch=0", "modulation.window=2"],
    ],
    ids=["mmtm-opm_ogm", "mmtm-greedy"],
)
def test_a_resumed_mid_fusion_run_equals_the_uninterrupted_one(train_run, tmp_path, method):
    """The running squeeze means and gates (model buffers), OPM's previous ρ and Greedy's sums and curation
    state are all in the checkpoint."""
    from test_resume import _assert_same_run, _killed_copy

    _, full = train_run(*method, "trainer.checkpoint_every_n_steps=3", "trainer.keep_checkpoints=10", name="full")
    _killed_copy(full, tmp_path / "part", 3)
    _, resumed = train_run(*method, "trainer.checkpoint_every_n_steps=3", "trainer.resume=auto", name="part")
    _assert_same_run(full, resumed)
