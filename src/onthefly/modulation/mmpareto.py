"""MMPareto (Wei & Hu, ICML 2024; docs/method.md, "Zoo methods, part 1a").

Each modality gets an auxiliary linear head and its own cross-entropy L_m next to the fused loss L_mm. On each
encoder the two gradients g_mm = ∇L_mm and g_u = ∇L_m are compared: when they agree (cos > 0) they are averaged,
otherwise the two-task min-norm (Pareto) weights are used; each tensor's combined gradient is rescaled to at least
the norm of the summed gradient and multiplied by γ. The heads get the plain gradient of L_mm + Σ_m L_m.

The step needs only one extra backward per encoder: g_u comes from ``torch.autograd.grad`` of L_m (it reaches
only encoder m), and by linearity g_mm = (the accumulated gradient) − g_u.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from onthefly.config import NonNegativeInt, PositiveFloat, configurable
from onthefly.modulation.base import EpochWindow, Modulation, StepContext
from onthefly.modulation.helpers import UnimodalHeads, flat, loss_gradients, set_gradients
from onthefly.modulation.zoo import Variant, mean_over_ranks


def pareto_weights(g_mm: torch.Tensor, g_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_1, cos) for two flat gradients: c_1 = ½ when cos(g_mm, g_u) > 0, else the min-norm weight of g_mm in
    min_c ‖c g_mm + (1−c) g_u‖, c_1 = (⟨g_u,g_u⟩ − ⟨g_mm,g_u⟩) / ‖g_mm − g_u‖² (with the released solver's
    degenerate branches 0.999 / 0.001). c_2 = 1 − c_1."""
    v11, v12, v22 = g_mm.dot(g_mm), g_mm.dot(g_u), g_u.dot(g_u)
    cos = v12 / (v11.sqrt() * v22.sqrt()).clamp_min(1e-8)
    solved = (v22 - v12) / (v11 + v22 - 2 * v12).clamp_min(1e-30)
    solved = torch.where(
        v12 >= v11, torch.full_like(v11, 0.999), torch.where(v12 >= v22, torch.full_like(v11, 0.001), solved)
    )
    return torch.where(cos > 0, torch.full_like(cos, 0.5), solved), cos


def pareto_gradients(
    total: Sequence[torch.Tensor],
    g_mm: Sequence[torch.Tensor],
    g_u: Sequence[torch.Tensor],
    c1: torch.Tensor,
    gamma: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per tensor P: n_P = 2c_1 g_mm[P] + 2c_2 g_u[P]; with t_P = ‖total[P]‖ (the summed loss's gradient),
    grad[P] = γ·max(t_P/‖n_P‖, 1)·n_P (a tensor with n_P = 0 keeps n_P = 0). Returns (grads, t_P/‖n_P‖ [P])."""
    new = [2 * c1 * a + 2 * (1 - c1) * b for a, b in zip(g_mm, g_u)]
    t = torch.stack(torch._foreach_norm(list(total)))
    n = torch.stack(torch._foreach_norm(new))
    ratio = torch.where(n > 0, t / n.clamp_min(1e-30), torch.ones_like(n))
    scale = gamma * ratio.clamp_min(1.0)
    return [g * s for g, s in zip(new, scale.unbind(0))], ratio


def _mean_over_ranks(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Under DDP the accumulated gradient is the mean over ranks: g_u must be too (no-op in one process)."""
    vec = mean_over_ranks(flat(grads))
    return [v.view_as(g) for v, g in zip(vec.split([g.numel() for g in grads]), grads)]


@configurable("modulation")
class MMPareto(Modulation):
    """MMPareto as released (``variant=official``: auxiliary heads, g_mm and g_u compared per encoder).
    ``variant=balancebenchmark`` reproduces BalanceBenchmark's version: the uni-modal losses are read off the
    fusion head (W-slice logits) and the two compared gradients are the same accumulated gradient, so cos = 1,
    the Pareto branch never runs and every encoder gradient is 2γ(g_mm + g_u)."""

    def __init__(
        self,
        gamma: PositiveFloat = 1.5,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = None,
        variant: Variant = Variant.official,
    ):
        self.gamma, self.variant = float(gamma), Variant(variant)
        self.window = EpochWindow(start, end)
        self.aux: Optional[UnimodalHeads] = None
        self._g_u: Dict[str, list[torch.Tensor]] = {}

    def setup(self, model, num_classes: int) -> None:
        self.params = {m: [p for p in enc.parameters() if p.requires_grad] for m, enc in model.encoders.items()}
        if self.variant is Variant.official:
            device = next(model.parameters()).device
            self.aux = UnimodalHeads(model.feature_dims, num_classes).to(device)

    def extra_module(self):
        return self.aux

    def after_forward(self, ctx: StepContext) -> None:
        labels = ctx.labels.long()
        feats = {m: ctx.features[m] for m in ctx.modalities}
        if self.aux is not None:
            uni = self.aux(feats)
        else:  # the benchmark's uni-modal logits: the fusion head's own estimator, with gradient
            head = ctx.model.head
            uni = head.unimodal_logits(feats, "natural" if head.natural_estimator else "zero_out")
        losses = {m: F.cross_entropy(uni[m], labels) for m in ctx.modalities}
        for m, loss in losses.items():
            ctx.extra_losses[f"mmpareto_uni_{m}"] = loss
        self._g_u = {}
        if ctx.epoch in self.window and self.variant is Variant.official:
            for m, loss in losses.items():  # one backward through encoder m alone
                self._g_u[m] = loss_gradients({m: loss}, self.params[m])[m]
        ctx.log_per_modality("mmpareto_uniloss", torch.stack([loss.detach().float() for loss in losses.values()]))
        ctx.log_per_modality(
            "mmpareto_uniacc",
            torch.stack([(uni[m].detach().argmax(1) == labels).float().mean() for m in ctx.modalities]),
        )

    def after_backward(self, ctx: StepContext) -> None:
        if ctx.epoch not in self.window:
            return
        stats = {k: [] for k in ("cos", "conflict", "c1", "ratio_mean", "ratio_max")}
        for m in ctx.modalities:
            params = self.params[m]
            total = [torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float() for p in params]
            if self.variant is Variant.official:
                g_u = _mean_over_ranks(self._g_u[m])
                g_mm = [t - u for t, u in zip(total, g_u)]
            else:  # the benchmark reads both gradients after every loss was back-propagated: the same tensor
                g_mm = g_u = total
            c1, cos = pareto_weights(flat(g_mm), flat(g_u))
            new, ratio = pareto_gradients(total, g_mm, g_u, c1, self.gamma)
            set_gradients(params, new)
            for key, value in (
                ("cos", cos),
                ("conflict", (cos <= 0).float()),
                ("c1", c1),
                ("ratio_mean", ratio.mean()),
                ("ratio_max", ratio.max()),
            ):
                stats[key].append(value)
        for key, values in stats.items():
            ctx.log_per_modality(f"mmpareto_{key}", torch.stack(values))
        self._g_u = {}
