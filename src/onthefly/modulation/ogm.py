"""On-the-fly Gradient Modulation, with and without Generalization Enhancement noise (docs/method.md §3)."""

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


def tie_rule(
    k: torch.Tensor, scores: torch.Tensor, index: int, alpha: float, form: CoeffForm | str = CoeffForm.paper
) -> torch.Tensor:
    """The released CVPR code's tie rule (docs/method.md §9): when every modality has exactly the same score
    (ρ = 1), the modality ``index`` is modulated as if dominant, k = 1 - tanh(α·1) (its else-branch); otherwise
    ``k`` unchanged. No host sync."""
    tie = (scores == scores[0]).all()
    arg = 0.0 if CoeffForm(form) is CoeffForm.shifted else 1.0  # α·ρ (paper) or α·(ρ - 1) (shifted) at ρ = 1
    at_one = 1 - torch.tanh(torch.full_like(k, alpha * arg))
    onehot = torch.zeros_like(k, dtype=torch.bool)
    onehot[index] = True
    return torch.where(tie & onehot, at_one, k)


def tie_index(tie_modality: Optional[str], modalities: list[str]) -> Optional[int]:
    """The position of ``tie_modality`` in the model's modalities: a modality's name, or ``first`` / ``second``
    (the released codes' else-branches: CVPR 2022 modulates the first, audio; the journal code the second,
    visual); None: no tie rule."""
    if tie_modality is None:
        return None
    if tie_modality in modalities:
        return modalities.index(tie_modality)
    if tie_modality in ("first", "second") and len(modalities) >= 2:
        return 0 if tie_modality == "first" else 1
    raise ValueError(
        f"modulation.tie_modality={tie_modality!r}: use one of the modalities {modalities}, first, second, or null"
    )


def select_parameters(encoder: nn.Module, scope: Scope | str) -> list[nn.Parameter]:
    """The encoder tensors OGM modulates, chosen by structure (never by parsing parameter names)."""
    scope = Scope(scope)
    conv = [p for p in encoder.parameters() if p.requires_grad and p.dim() == 4]
    if scope is Scope.conv or (scope is Scope.auto and conv):
        return conv
    return [p for p in encoder.parameters() if p.requires_grad and p.dim() > 1]


class FusionParams(str, enum.Enum):
    none = "none"  # the encoder only (the official code)
    interaction = "interaction"  # + the interaction's parameters of m alone (MMTM excitation, token projection)
    all = "all"  # + the head's parameters of m alone too (a per-branch classifier)


class Level(str, enum.Enum):
    auto = "auto"  # feature where the model's modalities share parameters (a shared transformer), else parameter
    parameter = "parameter"  # scale encoder m's parameter gradients after backward (the official code)
    feature = "feature"  # scale ∂L/∂φ_m through a hook on the features: every gradient upstream of φ_m


def modulate_gradients(grads: list[torch.Tensor], k: torch.Tensor, ge_scale: float, scaled: bool = False) -> None:
    """In place: g <- k·g + ε, ε ~ N(0, (ge_scale·(std(g) + 1e-8))²) with std of the unscaled g (no noise if 0).
    ``scaled``: the gradients already hold k·g (a feature hook scaled them): add only the noise, its std taken as
    std(k·g)/k."""
    if not grads:
        return
    if ge_scale > 0:
        stds = [torch.nan_to_num(g.std(), nan=0.0).add(1e-8).mul(ge_scale) for g in grads]
        if scaled:
            stds = [s / k.clamp_min(1e-8) for s in stds]
    if not scaled:
        torch._foreach_mul_(grads, k)
    if ge_scale > 0:
        # one contiguous draw for all tensors (i.i.d., so its layout is irrelevant): randn_like on
        # channels_last gradients takes a slow path, ~6x slower on CPU
        noise = torch.randn(sum(g.numel() for g in grads), device=grads[0].device, dtype=grads[0].dtype)
        chunks = noise.split([g.numel() for g in grads])
        torch._foreach_add_(grads, [c.view(g.shape).mul_(s) for c, g, s in zip(chunks, grads, stds)])


@configurable("modulation")
class OGM(Modulation):
    """Scale the dominant modality's encoder gradients by k_m after backward (+ GE noise when ``ge``).

    On mid-fusion models (docs/method.md §10.4): ``level=parameter`` scales ``model.encoders[m]``'s parameters only
    (the interaction's and the head's untouched unless ``fusion_params`` names them); ``level=feature`` scales the gradient of
    m's feature φ_m instead (a hook set in on_features), which reaches every parameter upstream of φ_m, shared or
    not; ``auto`` picks feature where the modalities share parameters."""

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
        level: Level = Level.auto,
        fusion_params: FusionParams = FusionParams.none,
        tie_modality: Optional[str] = None,
    ):
        self.alpha, self.coeff_form, self.scope = float(alpha), CoeffForm(coeff_form), Scope(scope)
        self.window = EpochWindow(start, end, warmup_epochs)
        self.noise = float(ge_scale) if ge else 0.0
        self.level, self.fusion_params = Level(level), FusionParams(fusion_params)
        self.tie_modality, self.tie_index = tie_modality, None
        self.params: dict[str, list[nn.Parameter]] = {}
        self._k: Optional[torch.Tensor] = None  # this step's k when feature hooks scaled the gradients

    def setup(self, model, num_classes: int) -> None:
        self.tie_index = tie_index(self.tie_modality, list(model.encoders))
        if self.level is Level.auto:
            self.level = Level.feature if getattr(model, "shares_parameters", False) else Level.parameter
        self.params = {m: select_parameters(enc, self.scope) for m, enc in model.encoders.items()}
        if self.fusion_params is not FusionParams.none:  # parameters outside the encoder that act on m alone
            modules = [getattr(model, "interaction", None)]
            if self.fusion_params is FusionParams.all:
                modules.append(model.head)
            for m in self.params:
                own = {id(p) for p in self.params[m]}
                extra = [
                    p
                    for mod in modules
                    if mod is not None
                    for p in getattr(mod, "modality_parameters", lambda _m: [])(m)
                ]
                self.params[m] += [p for p in extra if p.requires_grad and id(p) not in own]
        for m, ps in self.params.items():
            if not ps:
                warnings.warn(
                    f"OGM scope '{self.scope.value}' selects no parameter of the {m} encoder, so OGM does nothing "
                    "to it; use modulation.scope=all for non-convolutional encoders.",
                    stacklevel=2,
                )

    def coefficients(self, ctx: StepContext) -> torch.Tensor:
        """This step's k_m, with the released tie rule where ``tie_modality`` is set."""
        k = ogm_coefficients(ctx.rho, self.alpha, self.coeff_form)
        if self.tie_index is not None and ctx.scores is not None:
            k = tie_rule(k, ctx.scores, self.tie_index, self.alpha, self.coeff_form)
        return k

    def on_features(self, ctx: StepContext) -> None:
        self._k = None
        if self.level is not Level.feature or ctx.epoch not in self.window:
            return
        k = self.coefficients(ctx)
        for i, m in enumerate(ctx.modalities):
            feat = ctx.features[m]
            if feat.requires_grad:
                feat.register_hook(lambda g, ki=k[i]: g * ki.to(g.dtype))
        self._k = k

    def after_backward(self, ctx: StepContext) -> None:
        if ctx.epoch not in self.window:
            ctx.log_per_modality("k", torch.ones_like(ctx.rho))
            return
        scaled = self._k is not None
        k = self._k if scaled else self.coefficients(ctx)
        for i, m in enumerate(ctx.modalities):
            grads = [p.grad for p in self.params.get(m, []) if p.grad is not None]
            if scaled and not self.noise:
                continue
            modulate_gradients(grads, k[i].to(grads[0].dtype) if grads else k[i], self.noise, scaled)
        ctx.log_per_modality("k", k)
