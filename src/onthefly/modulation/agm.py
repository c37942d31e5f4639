"""AGM, Adaptive Gradient Modulation (Li et al., ICCV 2023; docs/method.md, "Zoo methods, part 1a").

Each modality's mono-modal logits are its Shapley share of the fused logits, read off the model with the other
modalities' inputs zeroed (for two modalities m_a = ½(z − z_{0v} + z_{a0}), so m_a + m_v = z). Their
cross-entropies s_m give a current ratio r_m = exp(M/(M−1)·(s̄ − s_m)) and, from the running means T_m of s_m
since training began, a target r̄_m; the gradient reaching modality m is multiplied by
κ_m = exp(α·min(r̄_m − r_m, clamp)), so a modality that leads by more than it usually does is slowed.
"""

from __future__ import annotations

import enum
import itertools
import math
import warnings
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from onthefly.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveFloat, configurable
from onthefly.models.fusion import ConcatFusion, SumFusion
from onthefly.modulation.base import EpochWindow, Modulation, StepContext
from onthefly.modulation.ogm import Scope, select_parameters
from onthefly.modulation.zoo import Variant, mean_over_ranks

LOG_FLOOR = math.log(1e-8)  # a true-class probability below 1e-8 counts as 1e-8 (as released)


class Passes(str, enum.Enum):
    cheap = "cheap"  # each encoder once on an all-zero input (eval, no grad), then head passes (no grad)
    exact = "exact"  # the released code: eval-mode forward passes of the whole model on zeroed inputs, with grad
    feature = "feature"  # zero the features instead of the inputs (head passes only)


def coalitions(m: int) -> list[frozenset]:
    """Every subset of range(m) but the full one, smallest first."""
    return [frozenset(c) for r in range(m) for c in itertools.combinations(range(m), r)]


def shapley_logits(f: Dict[frozenset, torch.Tensor], m: int, include_empty: bool = True) -> list[torch.Tensor]:
    """Mono-modal logits from the coalition logits ``f`` (keys: subsets of range(m), the full set included).

    include_empty (AGM): m_i = Σ_{S ⊆ N∖i} w_S (f(S ∪ i) − f(S)) + f(∅)/M, w_S = |S|!(M−|S|−1)!/M!, so that
    Σ_i m_i = f(N). Without it (BalanceBenchmark) the empty coalition is left out and nothing is added."""
    out = []
    for i in range(m):
        total = f[frozenset()] / m if include_empty else 0
        for s in coalitions(m):
            if i in s or (not s and not include_empty):
                continue
            w = math.factorial(len(s)) * math.factorial(m - len(s) - 1) / math.factorial(m)
            total = total + w * (f[s | {i}] - f[s])
        out.append(total)
    return out


def agm_scores(mono: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """s_m = mean_i −log p(m_m)_i[y_i], a probability below 1e-8 counted as 1e-8; [M] float32, no gradient."""
    return torch.stack(
        [-F.log_softmax(z.detach().float(), 1).gather(1, labels[:, None]).clamp_min(LOG_FLOOR).mean() for z in mono]
    )


def agm_ratios(scores: torch.Tensor, variant: Variant | str = Variant.official) -> torch.Tensor:
    """r_m = exp(M/(M−1)·(s̄ − s_m)) (two modalities: r_a = exp(s_v − s_a)). ``balancebenchmark`` uses
    exp(M/(M−1)·(s_m − s̄)), the reciprocal: there a modality pulling ahead gets the larger coefficient."""
    m = scores.shape[0]
    diff = scores.mean() - scores
    if Variant(variant) is Variant.balancebenchmark:
        diff = -diff
    return torch.exp(m / (m - 1) * diff)


def agm_coefficients(target_ratio: torch.Tensor, ratio: torch.Tensor, alpha: float, clamp: float) -> torch.Tensor:
    """κ_m = exp(α·min(r̄_m − r_m, clamp))."""
    return torch.exp(alpha * (target_ratio - ratio).clamp_max(clamp))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by k (the released backward hook)."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        return grad * k.to(grad.dtype), None


def clip_if_large(
    params: Sequence[torch.Tensor], watched: Sequence[torch.Tensor], threshold: float, max_norm: float
) -> torch.Tensor:
    """If any entry of the ``watched`` gradients exceeds ±threshold, scale all ``params`` gradients to total norm
    ``max_norm`` (as clip_grad_norm_), without a host sync. Returns 1.0 when it clipped, else 0.0."""
    grads = [p.grad for p in params if p.grad is not None]
    seen = [p.grad for p in watched if p.grad is not None]
    if not grads or not seen:
        return torch.zeros(())
    large = torch.stack([g.abs().amax() for g in seen]).amax() > threshold
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = torch.where(large, (max_norm / (norm + 1e-6)).clamp_max(1.0), torch.ones_like(norm))
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return large.float()


def head_weight_slices(head, modalities: Sequence[str]):
    """(per-modality weight views of a linear head, its biases): the W_m column block of a concat head, or the
    branch weight of a sum head; None for other heads."""
    if isinstance(head, ConcatFusion):
        dims = [head.feature_dims[m] for m in head.modalities]
        order = dict(zip(head.modalities, range(len(dims))))
        starts = [sum(dims[:i]) for i in range(len(dims))]
        return ({m: (head.fc.weight, starts[order[m]], dims[order[m]]) for m in modalities}, [head.fc.bias])
    if isinstance(head, SumFusion):
        return (
            {m: (head.fc[m].weight, 0, head.fc[m].weight.shape[1]) for m in modalities},
            [head.fc[m].bias for m in modalities],
        )
    return None


@configurable("modulation")
class AGM(Modulation):
    """Adaptive Gradient Modulation. ``variant=official`` (default): Shapley shares with the empty coalition,
    r_m = exp(M/(M−1)(s̄ − s_m)), clamp 10, the κ_m scaling of encoder m's gradients and of its block of a linear
    head's weights (biases by the mean κ), clip to norm 1 when a head weight gradient exceeds ±1.
    ``variant=balancebenchmark``: no empty coalition, the reciprocal ratio, clamp 7, κ on encoder m's >1-D tensors
    only, clip threshold and norm 5."""

    def __init__(
        self,
        alpha: NonNegativeFloat = 1.0,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = 19,
        passes: Passes = Passes.cheap,
        clamp: Optional[PositiveFloat] = None,
        clip: Optional[PositiveFloat] = None,
        variant: Variant = Variant.official,
    ):
        self.alpha, self.passes, self.variant = float(alpha), Passes(passes), Variant(variant)
        bb = self.variant is Variant.balancebenchmark
        self.clamp = float(clamp) if clamp is not None else (7.0 if bb else 10.0)
        self.clip = float(clip) if clip is not None else (5.0 if bb else 1.0)
        self.window = EpochWindow(start, end)
        # exact + official: κ scales the gradient entering each m_m (the released backward hooks); otherwise the
        # gradients are scaled after backward
        self.through_loss = self.passes is Passes.exact and self.variant is Variant.official
        self.targets: Optional[torch.Tensor] = None  # T_m, running means of s_m since training began
        self.kappa: Optional[torch.Tensor] = None

    def setup(self, model, num_classes: int) -> None:
        if len(model.modalities) < 2:
            raise ConfigError(
                f"AGM balances modalities, but this model has only {model.modalities}; use "
                "modulation=none for uni-modal runs."
            )
        if self.variant is Variant.balancebenchmark:
            self.params = {m: select_parameters(enc, Scope.all) for m, enc in model.encoders.items()}
            self.slices = None
        else:
            self.params = {m: [p for p in enc.parameters() if p.requires_grad] for m, enc in model.encoders.items()}
            self.slices = head_weight_slices(model.head, model.modalities)
            if self.slices is None and not self.through_loss:
                warnings.warn(
                    f"AGM scales the head's per-modality weights of concat and sum heads only; with "
                    f"{type(model.head).__name__} it scales the encoders' gradients alone "
                    "(modulation.passes=exact scales through the head as released).",
                    stacklevel=2,
                )
        self.watched = [p for p in model.head.parameters() if p.dim() > 1]

    # --- the coalition logits ---------------------------------------------------------------------------------
    def _absent(self, ctx: StepContext) -> Dict[str, torch.Tensor]:
        """Each modality's feature when its input is missing: φ_m(0) (cheap) or 0 (feature)."""
        feats = ctx.features
        if self.passes is Passes.feature:
            return {m: torch.zeros_like(feats[m][:1]) for m in ctx.modalities}
        out = {}
        with torch.no_grad():
            for m in ctx.modalities:
                enc = ctx.model.encoders[m]
                was_training = enc.training
                enc.eval()  # BatchNorm statistics stay untouched
                out[m] = enc(torch.zeros_like(ctx.inputs[m][:1])).to(feats[m].dtype)
                enc.train(was_training)
        return out

    def _coalitions(self, ctx: StepContext) -> Dict[frozenset, torch.Tensor]:
        mods, feats, b = ctx.modalities, ctx.features, ctx.labels.shape[0]
        subsets = coalitions(len(mods))
        if self.passes is Passes.exact:  # eval-mode passes of the whole model on zeroed inputs
            inputs = dict(ctx.inputs)
            inputs.update(
                {
                    m: torch.cat([ctx.inputs[m] if i in s else torch.zeros_like(ctx.inputs[m]) for s in subsets])
                    for i, m in enumerate(mods)
                }
            )
            inputs.update(
                {
                    k: torch.cat([v] * len(subsets))
                    for k, v in ctx.inputs.items()
                    if k not in mods and torch.is_tensor(v)
                }
            )
            model = ctx.model
            was_training = model.training
            model.eval()
            with torch.set_grad_enabled(self.through_loss):
                logits = model.head(model.encode(inputs))
            model.train(was_training)
            f = dict(zip(subsets, logits.split(b)))
            f[frozenset(range(len(mods)))] = ctx.logits if self.through_loss else ctx.logits.detach()
            return f
        absent = self._absent(ctx)
        with torch.no_grad():
            stacked = {
                m: torch.cat([feats[m].detach() if i in s else absent[m].expand_as(feats[m]) for s in subsets])
                for i, m in enumerate(mods)
            }
            stacked.update({k: torch.cat([v] * len(subsets)) for k, v in feats.items() if k not in stacked})
            f = dict(zip(subsets, ctx.model.head(stacked).split(b)))
        f[frozenset(range(len(mods)))] = ctx.logits.detach()
        return f

    # --- each step ---------------------------------------------------------------------------------------------
    def after_forward(self, ctx: StepContext) -> None:
        m = len(ctx.modalities)
        labels = ctx.labels.long()
        official = self.variant is Variant.official
        mono = shapley_logits(self._coalitions(ctx), m, include_empty=official)
        scores = mean_over_ranks(agm_scores(mono, labels))  # every rank takes the same κ
        if self.targets is None:
            self.targets = torch.zeros(m)
        targets = self.targets.to(scores.device)
        ratio, target_ratio = agm_ratios(scores, self.variant), agm_ratios(targets, self.variant)
        active = ctx.epoch in self.window
        kappa = agm_coefficients(target_ratio, ratio, self.alpha, self.clamp) if active else torch.ones_like(scores)
        n = ctx.global_step + 1  # 1-based iteration since training began
        self.targets = targets * (n - 1) / n + scores / n
        self.kappa = kappa
        if self.through_loss:  # the released route: κ scales the gradient entering each m_m
            ctx.loss_weight = 0.0
            ctx.extra_losses["agm"] = F.cross_entropy(
                sum(_ScaleGrad.apply(z, kappa[i]) for i, z in enumerate(mono)), labels
            )
        ctx.log_per_modality("agm_score", scores)
        ctx.log_per_modality("agm_target", self.targets)
        ctx.log_per_modality("agm_ratio", ratio)
        ctx.log_per_modality("agm_target_ratio", target_ratio)
        ctx.log_per_modality("agm_kappa", kappa)
        ctx.log_per_modality("agm_acc", torch.stack([(z.detach().argmax(1) == labels).float().mean() for z in mono]))

    def after_backward(self, ctx: StepContext) -> None:
        kappa = self.kappa
        if not self.through_loss and kappa is not None:
            for i, m in enumerate(ctx.modalities):
                grads = [p.grad for p in self.params[m] if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, kappa[i].to(grads[0].dtype))
            if self.slices is not None:
                weights, biases = self.slices
                for i, m in enumerate(ctx.modalities):
                    w, start, width = weights[m]
                    if w.grad is not None:
                        w.grad.narrow(1, start, width).mul_(kappa[i].to(w.grad.dtype))
                for b in biases:
                    if b is not None and b.grad is not None:
                        b.grad.mul_(kappa.mean().to(b.grad.dtype))
        ctx.metrics["agm_clip"] = clip_if_large(list(ctx.model.parameters()), self.watched, self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"targets": None if self.targets is None else self.targets.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.targets = state.get("targets")
