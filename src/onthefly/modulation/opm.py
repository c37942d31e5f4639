"""On-the-fly Prediction Modulation: drop the dominant modality's features in the forward pass (docs/method.md §4)."""

from __future__ import annotations

import contextlib
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


class ExeDraw(str, enum.Enum):
    per_rank = "per_rank"  # under DDP each rank draws its own p_exe decision
    global_batch = "global_batch"  # one decision per global batch, the same on every rank (the released code)


def theta_of(q: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """θ = Σ_m d_m q_m / Σ_m d_m: the share of the features a step drops (docs/method.md §4)."""
    return (dims * q).sum() / dims.sum()


def released_theta_term(theta: torch.Tensor) -> torch.Tensor:
    """A loss term whose value is 0 and whose gradient is the one the released journal code gives θ (docs/method.md
    §9): its rescale is an autograd function that returns θ itself as the gradient of θ, i.e. θ·∂θ/∂params, the
    gradient of ½θ². Written as ½θ² - (½θ²).detach(), it goes through loss scaling and DDP's averaging like the
    loss itself and leaves the logged loss unchanged."""
    half = 0.5 * theta.float() ** 2
    return half - half.detach()


def opm_drop_probs(rho: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """q_m = clip(q_base · (1 + λ · tanh(ρ_m − 1)), 0, 1) where ρ_m > 1, else 0."""
    q = (q_base * (1 + lam * torch.tanh(rho - 1))).clamp(0.0, 1.0)
    return torch.where(rho > 1, q, torch.zeros_like(q))


def rescale_factors(q: torch.Tensor, dims: torch.Tensor, mode: Rescale | str) -> torch.Tensor:
    """Per-modality feature scale [M] applied to the kept features."""
    mode = Rescale(mode)
    if mode is Rescale.global_:
        return (1 / (1 - theta_of(q, dims)).clamp_min(1e-6)).expand_as(q)
    if mode is Rescale.per_modality:
        return 1 / (1 - q).clamp_min(1e-6)
    return torch.ones_like(q)


def draw_keep(batch: int, q: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Keep mask [B, M] bool: sample i keeps modality m with probability 1 − q_m."""
    return torch.rand(batch, q.shape[0], device=q.device, generator=generator) >= q


def apply_keep(feats: dict, keep: torch.Tensor, q: torch.Tensor, mode: Rescale | str) -> dict:
    """Zero each sample's φ_m where ``keep`` is False and rescale the rest (features of any rank [B, ...]; d_m is
    the last dimension, the feature or token width)."""
    mods = list(feats)
    dims = torch.tensor([feats[m].shape[-1] for m in mods], device=q.device, dtype=q.dtype)
    scale = rescale_factors(q, dims, mode)
    out = {}
    for i, m in enumerate(mods):
        f = feats[m]
        kept = keep[:, i].view(-1, *([1] * (f.dim() - 1)))
        out[m] = torch.where(kept, f * scale[i].to(f.dtype), torch.zeros_like(f))
    return out


def drop_features(feats: dict, q: torch.Tensor, mode: Rescale | str, generator: Optional[torch.Generator] = None):
    """Zero each sample's φ_m with probability q_m and rescale the rest.

    Returns (new features, keep mask [B, M] bool)."""
    keep = draw_keep(next(iter(feats.values())).shape[0], q, generator)
    return apply_keep(feats, keep, q, mode), keep


@configurable("modulation")
class OPM(Modulation):
    """Per step, with probability p_exe, drop each sample's dominant-modality features with probability q_m.

    On a model whose interaction applies keep masks inside the forward (MMTM, ``model.reads_keep_masks``), the
    masks are drawn in before_forward from the previous step's ρ (this step's ρ needs the forward that the masks
    change), handed to the model as ``ctx.keep``, and applied again at the head (docs/method.md §10.4).

    ``rescale_grad``: the released journal code's gradient through the rescale (docs/method.md §9): every executed
    drop adds θ·∂θ/∂params, q computed from scores that are not detached from the encoders (the gradient of ½θ²;
    global rescale, q from the current batch: not with masks drawn before the forward). ``exe_draw``: whether,
    under data parallelism, each rank draws its own p_exe decision or one is drawn per global batch, as the
    released code (one process) does.
    """

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
        rescale_grad: bool = False,
        exe_draw: ExeDraw = ExeDraw.per_rank,
    ):
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.rescale, self.q_source = Rescale(rescale), QSource(q_source)
        self.window = EpochWindow(start, end, warmup_epochs)
        self.rescale_grad, self.exe_draw = bool(rescale_grad), ExeDraw(exe_draw)
        if self.rescale_grad and (self.rescale is not Rescale.global_ or self.q_source is not QSource.current):
            raise ValueError(
                "modulation.rescale_grad=true is the released code's gradient of its global rescale, "
                "with q from the current batch: it needs modulation.rescale=global and "
                "modulation.q_source=current"
            )
        self.prev_rho: Optional[torch.Tensor] = None
        self.in_forward = False  # masks drawn before the forward (the model reads ctx.keep)
        self._q: Optional[torch.Tensor] = None

    def setup(self, model, num_classes: int) -> None:
        self.in_forward = bool(getattr(model, "reads_keep_masks", False))
        if self.in_forward and self.rescale_grad:
            raise ValueError(
                "modulation.rescale_grad=true needs q from this batch's scores, but this model reads its "
                "keep masks in the forward, drawn from the previous step's rho: set "
                "modulation.rescale_grad=false"
            )

    def _execute(self, ctx: StepContext) -> bool:
        """Whether this step drops: p_exe, drawn on this rank's stream or (exe_draw=global_batch) on the one all
        ranks share."""
        shared = ctx.shared_rng() if self.exe_draw is ExeDraw.global_batch else contextlib.nullcontext()
        with shared:
            return torch.rand(()).item() < self.p_exe  # CPU generator: no device sync

    def before_forward(self, ctx: StepContext) -> None:
        self._q = None
        if not self.in_forward or self.prev_rho is None or ctx.epoch not in self.window:
            return
        self._q = opm_drop_probs(self.prev_rho.to(ctx.device), self.q_base, self.lam)
        if self._execute(ctx):
            ctx.keep = draw_keep(ctx.labels.shape[0], self._q)

    def on_features(self, ctx: StepContext) -> None:
        if self.in_forward:  # the masks were drawn before the forward: apply the same ones at the head
            self.prev_rho = ctx.rho.detach().clone()
            q, keep = self._q, ctx.keep
        else:
            rho = ctx.rho
            if self.q_source is QSource.previous:
                rho, self.prev_rho = self.prev_rho, ctx.rho.detach().clone()
            q = None if rho is None or ctx.epoch not in self.window else opm_drop_probs(rho, self.q_base, self.lam)
            keep = None
        if q is None:
            ctx.log_per_modality("q", torch.zeros_like(ctx.rho))
            self._log_no_drop(ctx, ctx.rho)
            return
        ctx.log_per_modality("q", q)
        feats = {m: ctx.features[m] for m in ctx.modalities}
        if self.in_forward:
            if keep is None:
                self._log_no_drop(ctx, q)
                return
            dropped = apply_keep(feats, keep, q, self.rescale)
        else:
            if not self._execute(ctx):
                self._log_no_drop(ctx, q)
                return
            if self.rescale_grad:
                ctx.extra_losses["opm_rescale_grad"] = released_theta_term(self._theta_with_grad(ctx))
            dropped, keep = drop_features(feats, q, self.rescale)
        ctx.features = {**ctx.features, **dropped}  # context inputs, side targets and side features left alone
        ctx.log_per_modality("drop", 1 - keep.float().mean(0))
        alive = keep.any(dim=1).to(q.dtype)  # a sample with every modality dropped leaves the loss
        ctx.metrics["opm_removed"] = 1 - alive.mean()
        ctx.sample_weight = alive if ctx.sample_weight is None else ctx.sample_weight * alive

    def _theta_with_grad(self, ctx: StepContext) -> torch.Tensor:
        """θ of this step from the undropped features' scores, with its gradient to the encoders (the head's
        weights held fixed, as the released code detaches them)."""
        if ctx.discrepancy_of is None:
            raise RuntimeError("modulation.rescale_grad needs the training loop's discrepancy_of (StepContext)")
        _, rho = ctx.discrepancy_of({m: ctx.features[m] for m in ctx.features})
        q = opm_drop_probs(rho, self.q_base, self.lam)
        dims = torch.tensor([ctx.features[m].shape[1] for m in ctx.modalities], device=q.device, dtype=q.dtype)
        return theta_of(q, dims)

    @staticmethod
    def _log_no_drop(ctx: StepContext, like: torch.Tensor) -> None:
        ctx.log_per_modality("drop", torch.zeros_like(like))  # same columns every step
        ctx.metrics["opm_removed"] = torch.zeros((), device=like.device)

    def state_dict(self) -> dict:
        return {"prev_rho": self.prev_rho}

    def load_state_dict(self, state: dict) -> None:
        self.prev_rho = state.get("prev_rho")
