"""On-the-fly Prediction Modulation: drop the dominant modality's features in the forward pass (METHOD.md §4)."""
from __future__ import annotations

import enum
from typing import Optional

import torch

from onthefly.config import NonNegativeFloat, NonNegativeInt, Probability, configurable
from onthefly.modulation.base import EpochWindow, Modulation, StepContext


# global: every feature × 1/(1 - θ), θ = Σ d_m q_m / Σ d_m (official code) | per_modality: φ_m × 1/(1 - q_m) | none.
# OmegaConf matches a config string to an enum member by NAME, and `global` is a Python keyword, so the enum is
# built with the functional API (member `global`; `global_` is an alias for code).
Rescale = enum.Enum(
    "Rescale",
    [("global", "global"), ("global_", "global"), ("per_modality", "per_modality"), ("none", "none")],
    type=str,
    module=__name__,
)


class QSource(str, enum.Enum):
    current = "current"  # q from this batch's undropped features (official code)
    previous = "previous"  # q from the previous step's ρ (the journal's figure)


def opm_drop_probs(rho: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """q_m = clip(q_base · (1 + λ · tanh(ρ_m − 1)), 0, 1) where ρ_m > 1, else 0."""
    q = (q_base * (1 + lam * torch.tanh(rho - 1))).clamp(0.0, 1.0)
    return torch.where(rho > 1, q, torch.zeros_like(q))


def rescale_factors(q: torch.Tensor, dims: torch.Tensor, mode: Rescale | str) -> torch.Tensor:
    """Per-modality feature scale [M] applied to the kept features."""
    mode = Rescale(mode)
    if mode is Rescale.global_:
        theta = (dims * q).sum() / dims.sum()
        return (1 / (1 - theta).clamp_min(1e-6)).expand_as(q)
    if mode is Rescale.per_modality:
        return 1 / (1 - q).clamp_min(1e-6)
    return torch.ones_like(q)


def drop_features(feats: dict, q: torch.Tensor, mode: Rescale | str, generator: Optional[torch.Generator] = None):
    """Zero each sample's φ_m with probability q_m and rescale the rest.

    Returns (new features, keep mask [B, M] bool)."""
    mods = list(feats)
    first = feats[mods[0]]
    keep = torch.rand(first.shape[0], len(mods), device=first.device, generator=generator) >= q
    dims = torch.tensor([feats[m].shape[1] for m in mods], device=q.device, dtype=q.dtype)
    scale = rescale_factors(q, dims, mode)
    out = {
        m: torch.where(keep[:, i, None], feats[m] * scale[i].to(feats[m].dtype), torch.zeros_like(feats[m]))
        for i, m in enumerate(mods)
    }
    return out, keep


@configurable("modulation")
class OPM(Modulation):
    """Per step, with probability p_exe, drop each sample's dominant-modality features with probability q_m."""

    needs_rho = True

    def __init__(
        self,
        q_base: Probability = 0.5,
        lam: NonNegativeFloat = 0.5,
        p_exe: Probability = 0.7,
        rescale: Rescale = Rescale.global_,
        q_source: QSource = QSource.current,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = None,
        warmup_epochs: NonNegativeInt = 0,
    ):
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.rescale, self.q_source = Rescale(rescale), QSource(q_source)
        self.window = EpochWindow(start, end, warmup_epochs)
        self.prev_rho: Optional[torch.Tensor] = None

    def on_features(self, ctx: StepContext) -> None:
        rho = ctx.rho
        if self.q_source is QSource.previous:
            rho, self.prev_rho = self.prev_rho, ctx.rho.detach().clone()
        if rho is None or ctx.epoch not in self.window:
            ctx.log_per_modality("q", torch.zeros_like(ctx.rho))
            ctx.log_per_modality("drop", torch.zeros_like(ctx.rho))
            return
        q = opm_drop_probs(rho, self.q_base, self.lam)
        ctx.log_per_modality("q", q)
        if torch.rand(()).item() >= self.p_exe:  # CPU generator: no device sync
            ctx.log_per_modality("drop", torch.zeros_like(q))  # same columns every step
            return
        dropped, keep = drop_features({m: ctx.features[m] for m in ctx.modalities}, q, self.rescale)
        ctx.features = {**ctx.features, **dropped}  # context inputs and side targets are left alone
        ctx.log_per_modality("drop", 1 - keep.float().mean(0))
        alive = keep.any(dim=1).to(q.dtype)  # a sample with every modality dropped leaves the loss
        ctx.sample_weight = alive if ctx.sample_weight is None else ctx.sample_weight * alive

    def state_dict(self) -> dict:
        return {"prev_rho": self.prev_rho}

    def load_state_dict(self, state: dict) -> None:
        self.prev_rho = state.get("prev_rho")
