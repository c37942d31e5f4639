"""Zoo methods, part 1b (docs/method.md): CML, LFM, InfoReg, MBSD and AMCo.

Each method's quantities on fixed small tensors against values worked by hand (in the comments) or by an
independent formula written here; then one short run of each method and variant on synth_av (slow)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.engine import checkpoint as ckpt
from onthefly.models import MultimodalModel
from onthefly.models.fusion import ConcatFusion, FiLMFusion, SumFusion
from onthefly.modulation import cml as cml_mod
from onthefly.modulation.amco import AMCo, MaskedSumHead, curriculum, dependence
from onthefly.modulation.base import StepContext
from onthefly.modulation.cml import CML, confidence_hinge, partial_logits
from onthefly.modulation.inforeg import InfoReg, regulation_coefficients, window_indicator
from onthefly.modulation.lfm import FITTED_COEFFS, LFM, alignment_divergence, fitted_alpha
from onthefly.modulation.mbsd import MBSD, pair_terms

from conftest import read_metrics, read_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AV = ["audio", "visual"]
LN = math.log


class Enc(nn.Module):
    """A linear encoder with the ``out_dim`` the model reads (no batch norm, so train and eval modes agree)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc, self.out_dim = nn.Linear(in_dim, out_dim), out_dim

    def forward(self, x):
        return torch.tanh(self.fc(x))


def tiny_model(head_cls=ConcatFusion, num_classes=3, dims=(("audio", 5), ("visual", 7)), seed=0) -> MultimodalModel:
    torch.manual_seed(seed)
    encoders = {m: Enc(d, 4) for m, d in dims}
    return MultimodalModel(encoders, head_cls({m: 4 for m, _ in dims}, num_classes))


def ctx_for(model, epoch=0, step=0, modalities=AV, **kw) -> StepContext:
    return StepContext(epoch=epoch, step=step, global_step=step, model=model, modalities=list(modalities), **kw)


def close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), f"\n{actual}\n!=\n{expected}"


# --- CML -------------------------------------------------------------------------------------------------------
# Two classes, so confidences are easy: logits [0, ln 3] -> p = [1/4, 3/4].
FULLER = torch.tensor([[0.0, LN(3)], [LN(3), 0.0], [0.0, LN(4)]])  # conf .75 (pred 1), .75 (pred 0), .8 (pred 1)
REDUCED = torch.tensor([[0.0, LN(4)], [0.0, LN(9)], [0.0, LN(3)]])  # conf .8 (pred 1), .9 (pred 1), .75 (pred 1)
LABELS = torch.tensor([1, 1, 1])


def test_cml_hinge_per_sample_with_the_sign_mask_by_hand():
    # sample 0: both right, confidence rises .75 -> .8: σ = 1, penalty .05
    # sample 1: the reduced input is right and the fuller wrong: σ = 0 (that rise is allowed), penalty 0
    # sample 2: confidence falls: penalty 0
    penalty, d = confidence_hinge(FULLER, REDUCED, LABELS, 0.0, "official")
    close(penalty, 0.05)
    close(d["sigma"], [1.0, 0.0, 1.0])
    close(d["violation"], [1.0, 1.0, 0.0])
    # a margin ε = .02 is taken from every masked difference: relu(.05 - .02) + relu(0 - .02) + relu(-.05 - .02)
    close(confidence_hinge(FULLER, REDUCED, LABELS, 0.02, "official")[0], 0.03)


def test_cml_benchmark_hinge_is_on_the_batch_sum_without_the_mask():
    # max(0, .05 + .15 - .05) = .15; the sign mask is not used
    close(confidence_hinge(FULLER, REDUCED, LABELS, 0.0, "balancebenchmark")[0], 0.15)
    # a batch whose sum falls gives 0 even though sample 0 rises
    close(confidence_hinge(FULLER[[0, 2]], REDUCED[[0, 2]], LABELS[:2], 0.0, "balancebenchmark")[0], 0.0)


def test_cml_chain_zeroes_the_modalities_in_each_samples_order():
    dims = {"audio": 3, "visual": 4, "sensor": 2}
    torch.manual_seed(0)
    head = ConcatFusion(dims, 5)
    feats = {m: torch.randn(2, d) for m, d in dims.items()}
    # sample 0 loses sensor, then audio; sample 1 loses visual, then sensor
    positions = torch.tensor([[1, 2, 0], [2, 0, 1]])
    level1, level2 = partial_logits(head, feats, list(dims), positions)

    def zeroed(i, gone):
        return head({m: torch.zeros_like(f[i : i + 1]) if m in gone else f[i : i + 1] for m, f in feats.items()})[0]

    close(level1, torch.stack([zeroed(0, {"sensor"}), zeroed(1, {"visual"})]))
    close(level2, torch.stack([zeroed(0, {"sensor", "audio"}), zeroed(1, {"visual", "sensor"})]))


def test_cml_loss_averages_the_chain_and_adds_lambda_times_the_hinge(monkeypatch):
    model = tiny_model()
    feats = {"audio": torch.randn(4, 4), "visual": torch.randn(4, 4)}
    labels = torch.tensor([0, 1, 2, 1])
    positions = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])  # audio removed for samples 0, 2, 3
    monkeypatch.setattr(cml_mod, "removal_positions", lambda *a: positions)
    method = CML(lam=0.1)
    method.setup(model, 3)
    ctx = ctx_for(model, features=feats, labels=labels, logits=model.head(feats))
    method.after_forward(ctx)
    partial = torch.stack(
        [
            model.head(
                {
                    "audio": torch.zeros(1, 4) if p[0] == 0 else feats["audio"][i : i + 1],
                    "visual": torch.zeros(1, 4) if p[1] == 0 else feats["visual"][i : i + 1],
                }
            )[0]
            for i, p in enumerate(positions)
        ]
    )
    assert ctx.loss_weight == pytest.approx(0.5)
    close(ctx.extra_losses["cml_ce_partial"], 0.5 * F.cross_entropy(partial, labels))
    close(ctx.extra_losses["cml_rank"], 0.1 * confidence_hinge(ctx.logits, partial, labels)[0])
    close(ctx.metrics["cml_removed_audio"], 0.75)


def test_cml_benchmark_variant_removes_one_modality_per_epoch_for_every_sample():
    model = tiny_model()
    method = CML(variant="balancebenchmark")
    method.setup(model, 3)
    torch.manual_seed(3)
    method.epoch_start(ctx_for(model))
    first = int(method.order[0])
    feats = {"audio": torch.randn(6, 4), "visual": torch.randn(6, 4)}
    ctx = ctx_for(model, features=feats, labels=torch.zeros(6, dtype=torch.long), logits=model.head(feats))
    method.after_forward(ctx)
    assert float(ctx.metrics[f"cml_removed_{AV[first]}"]) == 1.0
    assert float(ctx.metrics[f"cml_removed_{AV[1 - first]}"]) == 0.0


def test_cml_does_nothing_outside_its_window():
    model = tiny_model()
    method = CML(start=2, end=3)
    feats = {"audio": torch.randn(2, 4), "visual": torch.randn(2, 4)}
    ctx = ctx_for(model, epoch=1, features=feats, labels=torch.tensor([0, 1]), logits=model.head(feats))
    method.after_forward(ctx)
    assert ctx.loss_weight == 1.0 and not ctx.extra_losses


# --- LFM -------------------------------------------------------------------------------------------------------
# α₁ at these epochs, read off the released polynomial (rounded to 3 decimals)
LFM_TABLE = {0: 0.205, 20: 0.301, 50: 0.437, 80: 0.500, 100: 0.539, 150: 0.821, 170: 0.969, 183: 1.011, 199: 0.916}


def test_lfm_fitted_schedule_matches_the_released_polynomial():
    poly = np.polynomial.Polynomial(FITTED_COEFFS)
    for epoch, value in LFM_TABLE.items():
        assert fitted_alpha(epoch, clamp=False) == pytest.approx(value, abs=5e-4)
        assert fitted_alpha(epoch, clamp=False) == pytest.approx(poly(epoch), rel=1e-12)
    # the released α₂ coefficients are the exact complement: α₁ + α₂ = 1
    alpha2 = (7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11)
    assert all(a + b == pytest.approx(0.0, abs=1e-15) for a, b in zip(FITTED_COEFFS[1:], alpha2[1:]))
    assert FITTED_COEFFS[0] + alpha2[0] == pytest.approx(1.0, abs=1e-12)
    # α₁ passes 1 (α₂ < 0) exactly at epochs 177-188; clamping keeps it at 1 there
    assert {e for e in range(200) if fitted_alpha(e, clamp=False) > 1} == set(range(177, 189))
    assert fitted_alpha(183) == 1.0 and fitted_alpha(250, clamp=False) < -2 and fitted_alpha(250) == 0.0


def test_lfm_schedule_follows_the_epoch_and_can_be_stretched():
    model = tiny_model()
    raw = LFM()
    raw.setup(model, 3)
    raw.epoch_start(ctx_for(model, epoch=20))
    assert raw.alpha[0] == pytest.approx(fitted_alpha(20)) and sum(raw.alpha) == pytest.approx(1.0)
    stretched = LFM(time_scale="stretch", run_epochs=50)
    stretched.epoch_start(ctx_for(model, epoch=25))  # t = 200 * 25 / 50 = 100
    assert stretched.alpha[0] == pytest.approx(LFM_TABLE[100], abs=5e-4)
    with pytest.raises(ValueError, match="run_epochs"):
        LFM(time_scale="stretch", run_epochs=None)


def test_lfm_alignment_is_the_released_divergence():
    za = torch.tensor([[0.0, LN(3)], [LN(2), 0.0]])  # p = [1/4, 3/4], [2/3, 1/3]
    zb = torch.tensor([[0.0, 0.0], [0.0, LN(4)]])  # q = [1/2, 1/2], [1/5, 4/5]
    p, q = np.array([[0.25, 0.75], [2 / 3, 1 / 3]]), np.array([[0.5, 0.5], [0.2, 0.8]])
    m = (p + q) / 2
    expected = 0.5 * ((m * np.log(m / p)).sum(1) + (m * np.log(m / q)).sum(1)).mean()  # ½[KL(m‖p) + KL(m‖q)]
    close(alignment_divergence(za, zb), expected)
    # the released expression, literally: F.kl_div(p.log(), m, batchmean) twice
    pa, pb = za.softmax(1), zb.softmax(1)
    mt = (pa + pb) / 2
    released = 0.5 * (F.kl_div(pa.log(), mt, reduction="batchmean") + F.kl_div(pb.log(), mt, reduction="batchmean"))
    close(alignment_divergence(za, zb), released)
    js = 0.5 * ((p * np.log(p / m)).sum(1) + (q * np.log(q / m)).sum(1)).mean()
    assert abs(expected - js) > 1e-4  # not the Jensen-Shannon divergence


def test_lfm_loss_is_twice_the_weighted_ce_and_alignment():
    model = tiny_model()
    method = LFM()
    method.setup(model, 3)
    method.epoch_start(ctx_for(model, epoch=50))
    a1 = fitted_alpha(50)
    feats = {"audio": torch.randn(4, 4), "visual": torch.randn(4, 4)}
    labels = torch.tensor([0, 1, 2, 1])
    ctx = ctx_for(model, epoch=50, features=feats, labels=labels, logits=model.head(feats))
    method.after_forward(ctx)
    z = model.head.natural_unimodal(feats)
    assert ctx.loss_weight == 0.0
    # the official model's ½(o_a + o_v): the mean of the W-slice logits = the fused logits / 2
    close(ctx.extra_losses["lfm_ce"], 2 * a1 * F.cross_entropy((z["audio"] + z["visual"]) / 2, labels))
    close(ctx.extra_losses["lfm_align"], 2 * (1 - a1) * alignment_divergence(z["audio"], z["visual"]))
    bb = LFM(variant="balancebenchmark")  # CE on the fused logits, α_cls = 0.95 before any update
    ctx = ctx_for(model, features=feats, labels=labels, logits=model.head(feats))
    bb.after_forward(ctx)
    close(ctx.extra_losses["lfm_ce"], 2 * 0.95 * F.cross_entropy(model.head(feats), labels))


def test_lfm_benchmark_alpha_step_is_a_hessian_vector_product():
    model = tiny_model().double()
    inputs = {"audio": torch.randn(10, 5, dtype=torch.float64), "visual": torch.randn(10, 7, dtype=torch.float64)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    method = LFM(variant="balancebenchmark", probe_samples=6)
    method.setup(model, 3)
    ctx = ctx_for(model, epoch=20, batches=lambda split, limit=None: iter([(inputs, labels)]))
    params = list(model.parameters())

    def loss_grads(theta_first):  # gradients of L_total and of CE at a changed first parameter
        with torch.no_grad():
            saved = params[0].clone()
            params[0].copy_(theta_first)
        feats = model.encode({k: v[:6] for k, v in inputs.items()})
        z = model.head.natural_unimodal(feats)
        ce = F.cross_entropy(model.head(feats), labels[:6])
        total = 0.95 * ce + 0.05 * alignment_divergence(z["audio"], z["visual"])
        g_total = torch.autograd.grad(total, params, retain_graph=True)
        g_ce = torch.autograd.grad(ce, params)
        with torch.no_grad():
            params[0].copy_(saved)
        return g_total, g_ce

    # (H v)_first = d/dh [∇L_total(θ + h v)]_first at h = 0 with v = ∇CE(θ): central differences over all of θ
    _, v = loss_grads(params[0].detach().clone())
    h = 1e-5

    def shifted(sign):
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, d in zip(params, v):
                p.add_(sign * h * d)
        g = loss_grads(params[0].detach().clone())[0][0]
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return g

    g = float(((shifted(1) - shifted(-1)) / (2 * h)).mean())
    method.epoch_start(ctx)  # epoch 20: lr_α halves first (1e-4 -> 5e-5)
    assert method.hvp == pytest.approx(g, rel=1e-5, abs=1e-9)
    assert method.lr_alpha == pytest.approx(5e-5)
    assert method.alpha[1] == pytest.approx(min(max(0.05 - 5e-5 * g, 0.05), 0.95))
    assert sum(method.alpha) == pytest.approx(1.0)


# --- InfoReg ---------------------------------------------------------------------------------------------------
def test_inforeg_window_indicator_by_hand():
    assert window_indicator([], 10) == 1.0  # first epoch
    # padded history [0, 0, 4, 2, 1] with a 2-epoch window
    assert window_indicator([4.0], 2) == pytest.approx((4 - 0) / (0 + 4))
    assert window_indicator([4.0, 2.0], 2) == pytest.approx((2 - 0) / (4 + 2))
    assert window_indicator([4.0, 2.0, 1.0], 2) == pytest.approx((1 - 4) / (2 + 1))
    assert window_indicator([0.0, 0.0], 2) == 0.0  # no trace at all: closed, not a division by zero


def test_inforeg_window_ends_when_the_trace_stops_growing():
    # a constant trace T = 1: k(e) = 1/e for 1 <= e <= 10 (> τ = .05), then (1 - 1)/10 = 0: the window is open in
    # epochs 0-10 and closed from epoch 11 on
    model = tiny_model()
    method = InfoReg()
    method.setup(model, 3)
    opened = []
    for epoch in range(14):
        method.epoch_start(ctx_for(model, epoch=epoch))
        opened.append(method.window_open)
        if 1 <= epoch <= 10:
            assert method.k == pytest.approx(1 / epoch)
        method.traces["audio"].append(1.0)
    assert opened == [True] * 11 + [False] * 3


def test_inforeg_coefficients_by_hand():
    coef = torch.tensor([0.95, 0.1])
    close(regulation_coefficients(torch.tensor([3.0, 1.0]), coef, True), [0.95 * math.exp(math.tanh(2.0)), 0.0])
    close(regulation_coefficients(torch.tensor([1.0, 2.5]), coef, True), [0.0, 0.1 * math.exp(math.tanh(1.5))])
    close(regulation_coefficients(torch.tensor([3.0, 1.0]), coef, False), [0.0, 0.0])
    close(regulation_coefficients(torch.tensor([2.0, 2.0]), coef, True), [0.0, 0.0])  # a tie regulates nobody
    # three modalities: the leader's gap is to the runner-up
    close(
        regulation_coefficients(torch.tensor([1.0, 4.0, 3.5]), torch.tensor([0.9, 0.5, 0.2]), True),
        [0.0, 0.5 * math.exp(math.tanh(0.5)), 0.0],
    )


def test_inforeg_proximal_gradient_and_fisher_trace():
    model = tiny_model()
    method = InfoReg()
    method.setup(model, 3)
    method.epoch_start(ctx_for(model))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    scores = torch.tensor([3.0, 1.0])  # audio leads by 2
    method.after_backward(ctx_for(model, scores=scores))
    beta = 0.95 * math.exp(math.tanh(2.0))
    # the added term is the gradient of (β/2)‖θ_a - θ_a⁰‖² (autograd on that term, independently)
    audio = [n for n, _ in model.named_parameters() if n.startswith("encoders.audio")]
    prox = sum(((p - theta0[n]) ** 2).sum() for n, p in model.named_parameters() if n in audio) * beta / 2
    prox_grads = dict(zip(audio, torch.autograd.grad(prox, [dict(model.named_parameters())[n] for n in audio])))
    for n, p in model.named_parameters():
        expected = grads[n] + prox_grads[n] if n in audio else grads[n]  # visual and head untouched
        close(p.grad, expected, tol=1e-5)
    # Fisher trace of the epoch: Σ over the encoder's weight matrices of mean(Σ_steps g²) (one step here)
    method.epoch_end(ctx_for(model))
    weight = model.encoders["audio"].fc.weight
    close(method.traces["audio"][-1], (weight.grad**2).mean(), tol=1e-5)
    close(method.traces["visual"][-1], (model.encoders["visual"].fc.weight.grad ** 2).mean(), tol=1e-5)


def test_inforeg_logs_its_coefficients_and_leaves_gradients_alone_when_the_window_is_closed():
    model = tiny_model()
    method = InfoReg()
    method.setup(model, 3)
    method.traces["audio"] = [1.0] * 12  # k = 0 at epoch 12
    method.epoch_start(ctx_for(model, epoch=12))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ctx = ctx_for(model, epoch=12, scores=torch.tensor([3.0, 1.0]))
    method.after_backward(ctx)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert float(ctx.metrics["inforeg_open"]) == 0.0 and float(ctx.metrics["inforeg_beta_audio"]) == 0.0
    close(
        ctx.metrics["inforeg_dist_audio"],
        0.1 * math.sqrt(sum(p.numel() for p in model.encoders["audio"].parameters())),
        tol=1e-5,
    )


def test_inforeg_needs_one_coefficient_per_modality():
    model = tiny_model(dims=(("audio", 5), ("visual", 7), ("sensor", 3)))
    with pytest.raises(ValueError, match="one per modality"):
        InfoReg().setup(model, 3)
    InfoReg(coef=[0.95, 0.1, 0.1]).setup(model, 3)


# --- MBSD ------------------------------------------------------------------------------------------------------
def benchmark_pair_loop(za, zb, labels):
    """The benchmark's per-sample loop, written out with numpy: w, RS (on logits), and F.kl_div(ps, pw)."""
    pa, pb = torch.softmax(za, 1).numpy(), torch.softmax(zb, 1).numpy()
    za, zb = za.numpy(), zb.numpy()
    w, rs, kd = [], [], []
    for i, y in enumerate(labels.tolist()):
        qa, qb = pa[i, y], pb[i, y]
        w.append(max(qa, qb) - min(qa, qb) if pa[i].argmax() == y or pb[i].argmax() == y else 0.0)
        ps, pw = max(qa, qb), min(qa, qb)
        kd.append(pw * (math.log(pw) - ps))
        rs.append(((za[i] - zb[i]) ** 2).sum() / za.shape[1])
    return np.array(w), np.array(rs), np.array(kd)


def test_mbsd_pair_terms_match_the_benchmarks_loop():
    za = torch.tensor([[0.0, LN(3)], [LN(2), 0.0], [0.0, 0.0], [LN(5), 0.0]], requires_grad=True)
    zb = torch.tensor([[0.0, 0.0], [0.0, LN(4)], [LN(3), 0.0], [0.0, LN(2)]], requires_grad=True)
    labels = torch.tensor([1, 1, 1, 1])
    # sample 0: q_a = 3/4 (right), q_b = 1/2 -> w = 1/4; sample 2: q_a = 1/2, q_b = 1/4, neither right -> w = 0
    terms = pair_terms(za, zb, labels, rs_on_probs=False)
    w, rs, kd = benchmark_pair_loop(za.detach(), zb.detach(), labels)
    close(terms["w"], w)
    close(terms["rs"], rs)
    close(terms["kd"], kd)
    assert terms["w"][0].item() == pytest.approx(0.25) and terms["w"][2].item() == 0.0
    assert terms["w"].requires_grad  # the benchmark lets gradients flow through w


def test_mbsd_corrected_distils_the_stronger_distribution_with_w_detached():
    za = torch.tensor([[0.0, LN(3)], [LN(2), 0.0]], requires_grad=True)  # p_a = [.25, .75], [2/3, 1/3]
    zb = torch.tensor([[0.0, 0.0], [0.0, LN(4)]], requires_grad=True)  # p_b = [.5, .5], [.2, .8]
    labels = torch.tensor([1, 1])
    terms = pair_terms(za, zb, labels, rs_on_probs=False, variant="corrected")
    # sample 0: a is stronger (.75 > .5): KL(p_a ‖ p_b); sample 1: b is stronger (.8 > 1/3): KL(p_b ‖ p_a)
    strong = np.array([[0.25, 0.75], [0.2, 0.8]])
    weak = np.array([[0.5, 0.5], [2 / 3, 1 / 3]])
    close(terms["kd"], (strong * np.log(strong / weak)).sum(1))
    assert not terms["w"].requires_grad
    (terms["kd"].sum()).backward()
    assert za.grad[0].abs().sum() == 0 and zb.grad[0].abs().sum() > 0  # the teacher gets no gradient


def test_mbsd_loss_over_three_modalities_averages_the_pairs_on_probabilities():
    model = tiny_model(dims=(("audio", 5), ("visual", 7), ("sensor", 3)))
    mods = ["audio", "visual", "sensor"]
    feats = {m: torch.randn(5, 4) for m in mods}
    labels = torch.tensor([0, 1, 2, 1, 0])
    method = MBSD()
    method.setup(model, 3)
    ctx = ctx_for(model, modalities=mods, features=feats, labels=labels, logits=model.head(feats))
    method.after_forward(ctx)
    z = {m: v.detach() for m, v in model.head.natural_unimodal(feats).items()}
    p = {m: torch.softmax(v, 1) for m, v in z.items()}
    rs, kd = [], []
    for a, b in (("audio", "visual"), ("audio", "sensor"), ("visual", "sensor")):
        w, _, k = benchmark_pair_loop(z[a], z[b], labels)
        rs.append((w * ((p[a] - p[b]) ** 2).mean(1).numpy()).mean())
        kd.append((w * k).mean())
    close(ctx.extra_losses["mbsd_rs"], np.mean(rs), tol=1e-5)
    close(ctx.extra_losses["mbsd_kd"], np.mean(kd), tol=1e-5)
    for m in mods:
        close(ctx.extra_losses[f"mbsd_uni_{m}"], F.cross_entropy(z[m], labels), tol=1e-5)
    outside = ctx_for(model, epoch=81, modalities=mods, features=feats, labels=labels, logits=model.head(feats))
    method.after_forward(outside)  # the window is 0-80: the fused CE alone
    assert not outside.extra_losses


# --- AMCo ------------------------------------------------------------------------------------------------------
def amco_setup(variant="bb_fixed", head_cls=ConcatFusion, num_classes=8, **kw):
    model = tiny_model(head_cls=head_cls, num_classes=num_classes)
    method = AMCo(variant=variant, **kw)
    method.setup(model, num_classes)
    return model, method


def test_amco_curriculum_by_hand():
    # l += epoch/10 a step from 0: epoch 1 gives l = 0, .1, .2, .3, .4 -> p_t = sin(π/2·min(.3, l)/.3)
    # = 0, 1/2, √3/2, 1, 1 -> N = ⌊8 p_t⌋ = 0, 4, 6, 8, 8 masked classes; epoch 0 never masks
    assert [curriculum(l, 0.3) for l in (0.0, 0.1, 0.2)] == pytest.approx([0.0, 0.5, math.sqrt(3) / 2])
    model, method = amco_setup()
    for epoch, expected in ((0, [0, 0, 0]), (1, [0, 4, 6, 8, 8])):
        method.epoch_start(ctx_for(model, epoch=epoch))
        method.flags = torch.tensor([True, False])
        zeros = []
        for step in range(len(expected)):
            method.before_forward(ctx_for(model, epoch=epoch, step=step))
            zeros.append(int((model.head.masks["audio"] == 0).sum()))
            assert torch.equal(model.head.masks["visual"], torch.ones(1, 8))  # not dependent: never masked
        assert zeros == expected


def test_amco_dependence_by_hand():
    za = torch.tensor([[0.0, LN(3)]])  # exp: 1, 3
    zb = torch.tensor([[LN(2), LN(2)]])  # exp: 2, 2 -> softmax over [1, 3, 2, 2]: audio 4/8, visual 4/8
    close(dependence([za, zb]), [0.5, 0.5])
    zb2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    za2 = torch.tensor([[LN(3), LN(3)], [0.0, LN(5)]])  # sample 0: 6/8 audio; sample 1: 6/8 audio
    close(dependence([za2, zb2]), [0.75, 0.25])


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_amco_mask_works_for_batch_sizes_other_than_two(batch):
    model, method = amco_setup()
    head = model.head
    assert isinstance(head, MaskedSumHead)
    method.epoch_start(ctx_for(model, epoch=1))
    method.flags = torch.tensor([True, False])
    for step in range(2):  # step 1: p_t = 1/2, four of the eight classes masked
        method.before_forward(ctx_for(model, epoch=1, step=step))
    mask = head.masks["audio"]
    feats = {"audio": torch.randn(batch, 4), "visual": torch.randn(batch, 4)}
    labels = torch.arange(batch) % 8
    z = head.base.natural_unimodal(feats)
    logits = head(feats)
    close(logits, head.star(z["audio"] * mask + z["visual"]))
    ctx = ctx_for(model, epoch=1, step=1, features=feats, labels=labels, logits=logits)
    method.after_forward(ctx)
    close(ctx.extra_losses["amco_uni_audio"], F.cross_entropy(z["audio"] * mask, labels))
    close(ctx.extra_losses["amco_uni_visual"], F.cross_entropy(z["visual"], labels))
    expected = dependence([z["audio"] * mask, z["visual"]]) > 0.5
    assert torch.equal(method.flags, expected) and head.masks is None
    head.eval()  # evaluation: no mask, Linear* over the wrapped head's output
    close(head(feats), head.star(head.base(feats)), tol=1e-5)


@pytest.mark.parametrize("batch", [2, 3])
def test_the_benchmarks_mask_shape_fails_for_batch_sizes_but_two(batch):
    # the benchmark expands its (K,) mask to (2, K) before multiplying the (B, K) uni-modal logits of a dependent
    # modality: that works for B = 2 only; the (1, K) mask used here broadcasts to any batch and equals it at B = 2
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    z = torch.randn(batch, 4)
    ours = z * mask.unsqueeze(0)
    if batch == 2:
        assert torch.equal(z * mask.unsqueeze(0).expand(2, -1), ours)
    else:
        with pytest.raises(RuntimeError):
            z * mask.unsqueeze(0).expand(2, -1)


def test_amco_bb_fixed_refuses_a_head_whose_unimodal_logits_do_not_add_up():
    with pytest.raises(ValueError, match="variant=feature"):
        amco_setup(head_cls=FiLMFusion)
    model, _ = amco_setup(head_cls=SumFusion)
    assert isinstance(model.head, MaskedSumHead)
    model, _ = amco_setup(variant="feature", head_cls=FiLMFusion)
    assert isinstance(model.head, FiLMFusion)  # the feature variant leaves the head alone


def test_amco_feature_variant_zeroes_channels_of_the_dependent_modality_only():
    model, method = amco_setup(variant="feature", ramp_epochs=3.0)
    method.steps_prev = 4  # last epoch had 4 steps: step 2 of epoch 1 is l = 1.5, p_t = sin(π/4)
    method.epoch_start(ctx_for(model, epoch=1))
    method.flags = torch.tensor([False, True])
    feats = {"audio": torch.rand(3, 4) + 1, "visual": torch.rand(3, 4) + 1}
    for step in range(3):
        method.before_forward(ctx_for(model, epoch=1, step=step))
    ctx = ctx_for(model, epoch=1, step=2, features=dict(feats), labels=torch.tensor([0, 1, 2]))
    method.on_features(ctx)
    assert torch.equal(ctx.features["audio"], feats["audio"])
    dropped = (ctx.features["visual"] == 0).all(0)
    assert int(dropped.sum()) == int(math.sin(math.pi / 4) * 4)  # ⌊p_t·d⌋ = 2 channels, the same for the batch
    ctx.logits = model.head(ctx.features)
    method.after_forward(ctx)
    z = model.head.natural_unimodal(feats)  # the co-optimisation CE sees the unmasked features
    close(ctx.extra_losses["amco_uni_visual"], F.cross_entropy(z["visual"], ctx.labels))


def test_amco_masks_are_the_same_for_a_given_step_on_every_rank():
    # mask draws come from a generator seeded by (seed, global step), not from the ranks' own streams
    a_model, a = amco_setup()
    b_model, b = amco_setup()
    b.seed = a.seed
    for seed, (method, model) in enumerate(((a, a_model), (b, b_model))):
        method.epoch_start(ctx_for(model, epoch=1))
        method.flags = torch.tensor([True, False])
        torch.manual_seed(seed)  # different global streams
        for step in range(2):
            method.before_forward(ctx_for(model, epoch=1, step=step))
    assert torch.equal(a_model.head.masks["audio"], b_model.head.masks["audio"])


# --- end to end on synth_av (slow) -----------------------------------------------------------------------------
RUNS = {
    "cml": (["modulation=cml"], ["cml_rank", "cml_violation", "cml_conf_full", "cml_removed_audio"]),
    "cml_bb": (["modulation=cml", "modulation.variant=balancebenchmark"], ["cml_rank", "cml_removed_visual"]),
    "lfm": (["modulation=lfm"], ["lfm_alpha1", "lfm_alpha2", "lfm_align", "lfm_ce"]),
    "lfm_bb": (["modulation=lfm", "modulation.variant=balancebenchmark"], ["lfm_alpha1", "lfm_alpha2"]),
    "inforeg": (
        ["modulation=inforeg"],
        [
            "inforeg_beta_audio",
            "inforeg_beta_visual",
            "inforeg_k",
            "inforeg_dist_audio",
            "inforeg_trace_audio",
            "inforeg_score_visual",
        ],
    ),
    "mbsd": (["modulation=mbsd"], ["mbsd_w", "mbsd_rs", "mbsd_kd", "mbsd_ce_audio", "mbsd_teacher_visual"]),
    "mbsd_corrected": (["modulation=mbsd", "modulation.variant=corrected"], ["mbsd_w", "mbsd_kd"]),
    "amco": (["modulation=amco"], ["amco_D_audio", "amco_flag_visual", "amco_pt", "amco_ce_audio"]),
    "amco_feature": (["modulation=amco", "modulation.variant=feature"], ["amco_D_visual", "amco_pt", "amco_masked"]),
    "amco_base": (["modulation=amco", "modulation.variant=bb_base_model"], ["amco_ce_audio", "amco_ce_visual"]),
    "cml_3": (["dataset=synth_av3", "modulation=cml"], ["cml_rank", "cml_removed_sensor"]),
    "inforeg_3": (
        ["dataset=synth_av3", "modulation=inforeg", "modulation.coef=[0.95,0.1,0.1]"],
        ["inforeg_beta_sensor", "inforeg_k"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_each_method_and_variant_trains_on_synth_av_and_logs_its_coefficients(train_run, name):
    overrides, columns = RUNS[name]
    results, out = train_run(*overrides)
    assert read_results(out)["status"] == "ok" == results["status"]
    steps = pd.read_csv(out / "steps.csv")
    for column in columns:
        values = steps[f"train/{column}"]
        assert values.notna().all() and np.isfinite(values).all(), column


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["modulation=inforeg"],
        ["modulation=amco"],
        ["modulation=cml", "modulation.variant=balancebenchmark"],
        ["modulation=lfm", "modulation.variant=balancebenchmark"],
    ],
    ids=["inforeg", "amco", "cml_bb", "lfm_bb"],
)
def test_a_run_resumed_mid_epoch_equals_the_uninterrupted_one(train_run, tmp_path, overrides):
    common = [*overrides, "trainer.checkpoint_every_n_steps=3", "trainer.keep_checkpoints=10"]
    _, full = train_run(*common, name="full")
    part = tmp_path / "part"  # global step 6: the middle of epoch 1 (4 steps an epoch)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt.path_for(full, 6), part / "checkpoints")
    _, resumed = train_run(*common, "trainer.resume=auto", name="part")
    pd.testing.assert_frame_equal(
        read_metrics(full).drop(columns=["time/epoch_s"]),
        read_metrics(resumed).drop(columns=["time/epoch_s"]),
        check_exact=True,
    )
