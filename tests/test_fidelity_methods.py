"""The released code's method choices (docs/method.md §9), each where it acts: OPM's rescale gradient (against a
finite-difference check of ½θ² and against the released autograd function), one p_exe draw per global batch,
the CVPR tie rule at ρ = 1, and FiLM / gated fusion at the feature level."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from onthefly.config import Estimator
from onthefly.engine.distributed import seeded_rng
from onthefly.engine.trainer import Trainer
from onthefly.models.fusion import ConcatFusion, FiLMFusion, GatedFusion
from onthefly.modulation.base import StepContext
from onthefly.modulation.discrepancy import discrepancy
from onthefly.modulation.ogm import OGM, tie_rule
from onthefly.modulation.opm import OPM, opm_drop_probs, theta_of

MODS = ["audio", "visual"]


class Toy(nn.Module):
    """Two linear encoders on fixed inputs and a concat head: small enough for finite differences."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoders = nn.ModuleDict({"audio": nn.Linear(5, 4), "visual": nn.Linear(5, 4)})
        self.head = ConcatFusion({"audio": 4, "visual": 4}, 3)
        self.x = {m: torch.randn(12, 5) for m in MODS}
        with torch.no_grad():  # labels that audio predicts: audio dominates (ρ_audio > 1), so θ > 0
            self.y = self.head.unimodal_logits(self.features())["audio"].argmax(1)

    def features(self):
        return {m: self.encoders[m](self.x[m]) for m in MODS}


def loop_view(model: Toy):
    """The pieces of the training loop that Trainer.discrepancy_with_grad reads, for one process."""
    return SimpleNamespace(
        model=model,
        estimator=Estimator.natural,
        task=SimpleNamespace(class_logits=lambda z: z),
        _all_reduce=None,
        dist=SimpleNamespace(world_size=1),
        cfg=SimpleNamespace(discrepancy=SimpleNamespace(reduce="pairwise")),
    )


def step_context(model: Toy) -> StepContext:
    feats = model.features()
    with torch.no_grad():
        unimodal = model.head.unimodal_logits({m: f.detach() for m, f in feats.items()})
        scores, rho = discrepancy(unimodal, model.y)
    ctx = StepContext(
        epoch=0,
        step=0,
        global_step=0,
        model=model,
        modalities=MODS,
        features=feats,
        labels=model.y,
        scores=scores,
        rho=rho,
    )
    ctx.discrepancy_of = lambda f: Trainer.discrepancy_with_grad(loop_view(model), f, model.y)
    return ctx


def half_theta_squared(model: Toy, opm: OPM) -> torch.Tensor:
    with torch.no_grad():
        feats = model.features()
        _, rho = discrepancy(model.head.unimodal_logits(feats), model.y)
        q = opm_drop_probs(rho, opm.q_base, opm.lam)
        return 0.5 * theta_of(q, torch.tensor([4.0, 4.0])) ** 2


def test_rescale_grad_is_the_gradient_of_half_theta_squared_by_finite_differences():
    model = Toy()
    opm = OPM(p_exe=1.0, rescale_grad=True)
    ctx = step_context(model)
    assert ctx.rho[0] > 1 > ctx.rho[1]
    opm.on_features(ctx)
    term = ctx.extra_losses["opm_rescale_grad"]
    assert term.item() == 0.0  # the logged loss is unchanged
    term.backward()
    for m in MODS:
        for param in model.encoders[m].parameters():
            numeric = torch.zeros_like(param)
            flat = param.data.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + 1e-2
                up = half_theta_squared(model, opm)
                flat[i] = old - 1e-2
                down = half_theta_squared(model, opm)
                flat[i] = old
                numeric.view(-1)[i] = (up - down) / 2e-2
            assert param.grad.abs().max() > 1e-4, m  # both encoders get the term (q uses both scores)
            torch.testing.assert_close(param.grad, numeric, atol=2e-4, rtol=2e-2)
    # the head's weights are held fixed, as the released code detaches them
    assert all(p.grad is None for p in model.head.parameters())


class ReleasedRescale(torch.autograd.Function):
    """The journal release's rescale as its autograd function defines it: x / (1 - θ) forward; backward gives x
    the scaled gradient and θ the value θ itself (written here again only to compare with)."""

    @staticmethod
    def forward(ctx, x, theta):
        ctx.save_for_backward(theta)
        return x / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        return grad / (1 - theta.item()), theta


def test_rescale_grad_equals_the_released_autograd_function():
    ours, released = Toy(seed=3), Toy(seed=3)
    opm = OPM(p_exe=1.0, rescale_grad=True)
    ctx = step_context(ours)
    opm.on_features(ctx)
    ctx.extra_losses["opm_rescale_grad"].backward()
    # the released computation: q from scores that are not detached (head weights detached), θ into the function
    feats = released.features()
    w, b = released.head.fc.weight.detach(), released.head.fc.bias.detach()
    logits = [feats["audio"] @ w[:, :4].t() + b / 2, feats["visual"] @ w[:, 4:].t() + b / 2]
    s = torch.stack([torch.softmax(z, 1).gather(1, released.y.view(-1, 1)).sum() for z in logits])
    q = opm_drop_probs(torch.stack([s[0] / s[1], s[1] / s[0]]), 0.5, 0.5)
    theta = (torch.tensor([4.0, 4.0]) * q).sum() / 8.0
    out = ReleasedRescale.apply(torch.stack([feats["audio"], feats["visual"]]), theta)
    (out * 0).sum().backward()  # only θ's path carries gradient
    for m in MODS:
        for p_ours, p_rel in zip(ours.encoders[m].parameters(), released.encoders[m].parameters()):
            torch.testing.assert_close(p_ours.grad, p_rel.grad, atol=1e-6, rtol=1e-4)


def test_rescale_grad_is_off_by_default_and_needs_the_global_rescale():
    model = Toy()
    ctx = step_context(model)
    OPM(p_exe=1.0).on_features(ctx)
    assert "opm_rescale_grad" not in ctx.extra_losses
    with pytest.raises(ValueError, match="needs modulation.rescale=global"):
        OPM(rescale="per_modality", rescale_grad=True)


def _decision(opm: OPM, global_seed: int, step: int) -> float:
    model = Toy()
    ctx = step_context(model)
    ctx.shared_rng = lambda: seeded_rng(torch.device("cpu"), 0, 3, step, 0)  # the trainer's stream of all ranks
    torch.manual_seed(global_seed)  # the rank's own stream differs from rank to rank
    opm.on_features(ctx)
    return float(ctx.metrics["drop_audio"] > 0)


def test_exe_draw_global_batch_gives_every_rank_the_same_decision():
    opm = OPM(p_exe=0.5, exe_draw="global_batch")
    for step in range(6):
        assert len({_decision(opm, rank, step) for rank in range(4)}) == 1
    per_rank = OPM(p_exe=0.5)
    assert any(len({_decision(per_rank, rank, step) for rank in range(4)}) > 1 for step in range(6))


def test_tie_rule_modulates_the_named_modality_only_at_an_exact_tie():
    k = torch.ones(2)
    tied, untied = torch.tensor([5.0, 5.0]), torch.tensor([5.0, 5.0001])
    alpha = 0.8
    assert torch.allclose(tie_rule(k, tied, 0, alpha), torch.tensor([1 - torch.tanh(torch.tensor(alpha)), 1.0]))
    assert torch.equal(tie_rule(k, untied, 0, alpha), k)
    assert torch.equal(tie_rule(k, tied, 0, alpha, "shifted"), k)  # 1 - tanh(α·0)
    ogm = OGM(alpha=alpha, tie_modality="first")
    model = Toy()
    ogm.setup(model, 3)
    ctx = step_context(model)
    ctx.scores, ctx.rho = tied, torch.ones(2)
    ctx.features["audio"].sum().backward()
    ogm.params = {m: list(model.encoders[m].parameters()) for m in MODS}
    before = model.encoders["audio"].weight.grad.clone()
    ogm.after_backward(ctx)
    assert torch.allclose(ctx.metrics["k_audio"], torch.tensor(1 - torch.tanh(torch.tensor(alpha)).item()))
    assert ctx.metrics["k_visual"] == 1.0
    torch.testing.assert_close(model.encoders["audio"].weight.grad, before * (1 - torch.tanh(torch.tensor(alpha))))
    assert OGM(tie_modality="second").setup(model, 3) is None
    with pytest.raises(ValueError, match="tie_modality='text'"):
        OGM(tie_modality="text").setup(model, 3)


def test_without_the_tie_rule_rho_one_modulates_nothing():
    ogm = OGM(alpha=0.8)
    model = Toy()
    ogm.setup(model, 3)
    ctx = step_context(model)
    ctx.scores, ctx.rho = torch.tensor([5.0, 5.0]), torch.ones(2)
    ogm.after_backward(ctx)
    assert ctx.metrics["k_audio"] == 1.0 and ctx.metrics["k_visual"] == 1.0


def test_feature_level_film_and_gated_are_the_released_equations():
    torch.manual_seed(0)
    feats = {"audio": torch.randn(6, 8), "visual": torch.randn(6, 8)}
    film = FiLMFusion({"audio": 8, "visual": 8}, 5, level="feature")
    assert film.film.weight.shape == (16, 8) and film.out.weight.shape == (5, 8)  # W: d -> 2d, then d -> C
    gamma, beta = (feats["audio"] @ film.film.weight.t() + film.film.bias).split(8, dim=1)
    torch.testing.assert_close(film(feats), (gamma * feats["visual"] + beta) @ film.out.weight.t() + film.out.bias)
    gated = GatedFusion({"audio": 8, "visual": 8}, 5, level="feature")
    u_a, u_v = gated.proj["audio"](feats["audio"]), gated.proj["visual"](feats["visual"])
    torch.testing.assert_close(gated(feats), gated.out(torch.sigmoid(u_a) * u_v))
    for head in (film, gated):
        assert head.natural_estimator == "zero_out" and not hasattr(head, "branch")
        zero = {m: torch.zeros_like(f) for m, f in feats.items()}
        uni = head.unimodal_logits(feats)
        torch.testing.assert_close(uni["audio"], head({"audio": feats["audio"], "visual": zero["visual"]}))
        torch.testing.assert_close(uni["visual"], head({"audio": zero["audio"], "visual": feats["visual"]}))
    # the logit-level heads (our default) keep their branches and parameters
    assert FiLMFusion({"audio": 8, "visual": 8}, 5).natural_estimator == "branch"
    assert set(dict(GatedFusion({"audio": 8, "visual": 8}, 5).named_children())) == {"branch", "out"}


def test_rescale_grad_is_refused_where_masks_are_drawn_before_the_forward():
    model = SimpleNamespace(reads_keep_masks=True)  # a mid-fusion model: q from the previous step's ρ
    with pytest.raises(ValueError, match="needs q from this batch's scores"):
        OPM(rescale_grad=True).setup(model, 3)
    OPM().setup(model, 3)  # without it, such a model keeps working
