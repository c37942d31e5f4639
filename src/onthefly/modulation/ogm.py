"""On-the-fly Gradient Modulation, with and without Generalization Enhancement noise (METHOD.md §3)."""
from __future__ import annotations

import enum
import warnings
from typing import Optional

import torch
from torch import nn

from onthefly.config import NonNegativeFloat, NonNegativeInt, configurable
from onthefly.modulation.base import EpochWindow, Modulation, StepContext


class CoeffForm(str, enum.Enum):
    paper = "paper"  # k = 1 - tanh(α ρ)        (the paper's equation and the released code)
    shifted = "shifted"  # k = 1 - tanh(α (ρ - 1))  (an early code version, later re-implementations)


class Scope(str, enum.Enum):
    auto = "auto"  # conv where the encoder has conv kernels (= the official code), else all (sequence encoders)
    conv = "conv"  # 4-D weights (conv kernels), as the official code
    all = "all"  # every encoder parameter with more than one dimension (transformers, LSTMs, MLPs)


def ogm_coefficients(rho: torch.Tensor, alpha: float, form: CoeffForm | str = CoeffForm.paper) -> torch.Tensor:
    """k_m = 1 - tanh(α·ρ_m) (or α·(ρ_m - 1) for `shifted`) where ρ_m > 1, else 1."""
    arg = rho - 1 if CoeffForm(form) is CoeffForm.shifted else rho
    return torch.where(rho > 1, 1 - torch.tanh(alpha * arg), torch.ones_like(rho))


def select_parameters(encoder: nn.Module, scope: Scope | str) -> list[nn.Parameter]:
    """The encoder tensors OGM modulates, chosen by structure (never by parsing parameter names)."""
    scope = Scope(scope)
    conv = [p for p in encoder.parameters() if p.requires_grad and p.dim() == 4]
    if scope is Scope.conv or (scope is Scope.auto and conv):
        return conv
    return [p for p in encoder.parameters() if p.requires_grad and p.dim() > 1]


def modulate_gradients(grads: list[torch.Tensor], k: torch.Tensor, ge_scale: float) -> None:
    """In place: g <- k·g + ε, ε ~ N(0, (ge_scale·(std(g) + 1e-8))²) with std of the unscaled g (no noise if 0)."""
    if not grads:
        return
    if ge_scale > 0:
        stds = [torch.nan_to_num(g.std(), nan=0.0).add(1e-8).mul(ge_scale) for g in grads]
    torch._foreach_mul_(grads, k)
    if ge_scale > 0:
        # one contiguous draw for all tensors (i.i.d., so its layout is irrelevant): randn_like on
        # channels_last gradients takes a slow path, ~6x slower on CPU
        noise = torch.randn(sum(g.numel() for g in grads), device=grads[0].device, dtype=grads[0].dtype)
        chunks = noise.split([g.numel() for g in grads])
        torch._foreach_add_(grads, [c.view(g.shape).mul_(s) for c, g, s in zip(chunks, grads, stds)])


@configurable("modulation")
class OGM(Modulation):
    """Scale the dominant modality's encoder gradients by k_m after backward (+ GE noise when ``ge``)."""

    needs_rho = True

    def __init__(
        self,
        alpha: NonNegativeFloat = 0.8,
        coeff_form: CoeffForm = CoeffForm.paper,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = 50,
        warmup_epochs: NonNegativeInt = 0,
        scope: Scope = Scope.auto,
        ge: bool = False,
        ge_scale: NonNegativeFloat = 1.0,
    ):
        self.alpha, self.coeff_form, self.scope = float(alpha), CoeffForm(coeff_form), Scope(scope)
        self.window = EpochWindow(start, end, warmup_epochs)
        self.noise = float(ge_scale) if ge else 0.0
        self.params: dict[str, list[nn.Parameter]] = {}

    def setup(self, model, num_classes: int) -> None:
        self.params = {m: select_parameters(enc, self.scope) for m, enc in model.encoders.items()}
        for m, ps in self.params.items():
            if not ps:
                warnings.warn(
                    f"OGM scope '{self.scope.value}' selects no parameter of the {m} encoder, so OGM does nothing "
                    "to it; use modulation.scope=all for non-convolutional encoders.",
                    stacklevel=2,
                )

    def after_backward(self, ctx: StepContext) -> None:
        if ctx.epoch not in self.window:
            ctx.log_per_modality("k", torch.ones_like(ctx.rho))
            return
        k = ogm_coefficients(ctx.rho, self.alpha, self.coeff_form)
        for i, m in enumerate(ctx.modalities):
            grads = [p.grad for p in self.params.get(m, []) if p.grad is not None]
            modulate_gradients(grads, k[i].to(grads[0].dtype) if grads else k[i], self.noise)
        ctx.log_per_modality("k", k)
