"""LFM, learning the modality gap (Yang et al., NeurIPS 2024), fitted-schedule release (docs/method.md,
"Zoo methods, part 1b").

The loss mixes a classification term and an alignment term between the uni-modal predictions,
L = 2·[α₁(t)·CE(fused) + α₂(t)·D(p_a, p_v)], with α₂ = 1 - α₁. The released code's D ("alignment") is
½[KL(m̄‖p_a) + KL(m̄‖p_v)] with m̄ = ½(p_a + p_v) (``alignment_divergence``); for M > 2 modalities it is
averaged over the pairs.

Variants:
    official           α₁(t) is the authors' fifth-order polynomial of the 0-based epoch (fitted to their learnt
                       weights over 200 epochs); the CE is on the mean of the uni-modal logits (their model
                       predicts ½(o_a + o_v); the fused logits / M here, equal to it for a concat or sum head)
    balancebenchmark   BalanceBenchmark's trainer: α learnt once per epoch from a Hessian-vector product on a small
                       held-out batch (start α_cls = 0.95, α_align = 0.05), CE on the head's fused logits
"""

from __future__ import annotations

import enum
import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from onthefly.config import Estimator, NonNegativeFloat, PositiveInt, configurable
from onthefly.modulation.base import Modulation, StepContext

# α₁(t) = Σ_j c_j t^j (the released fitted schedule; α₂ = 1 - α₁ has exactly the complementary coefficients)
FITTED_COEFFS = (2.04623704e-1, 3.35472727e-3, 1.22989557e-4, -2.92947416e-6, 2.23835486e-8, -5.39717505e-11)


class LFMVariant(str, enum.Enum):
    official = "official"
    balancebenchmark = "balancebenchmark"


class TimeScale(str, enum.Enum):
    raw = "raw"  # t = epoch (the released schedule as it is)
    stretch = "stretch"  # t = fit_epochs · epoch / run_epochs (the whole fitted curve over a shorter run)


def fitted_alpha(t: float, clamp: bool = True) -> float:
    """α₁(t) of the fitted schedule (clamped to [0, 1] when ``clamp``: the polynomial passes 1 near t = 183)."""
    value = sum(c * t**j for j, c in enumerate(FITTED_COEFFS))
    return min(max(value, 0.0), 1.0) if clamp else value


def alignment_divergence(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """½[KL(m̄‖p_a) + KL(m̄‖p_b)], m̄ = ½(p_a + p_b), batch mean: what the released ``Alignment`` computes
    (``F.kl_div(p.log(), m̄)`` is KL(m̄‖p)). Log-probabilities from log_softmax, so it stays finite (in float32 at
    least: autocast runs log_softmax in float32)."""
    la, lb = F.log_softmax(za, 1), F.log_softmax(zb, 1)
    lm = torch.logaddexp(la, lb) - math.log(2.0)
    m = lm.exp()
    return 0.5 * ((m * (lm - la)).sum(1) + (m * (lm - lb)).sum(1)).mean()


def pairwise_alignment(unimodal: list[torch.Tensor]) -> torch.Tensor:
    pairs = list(itertools.combinations(unimodal, 2))
    return sum(alignment_divergence(a, b) for a, b in pairs) / len(pairs)


@configurable("modulation")
class LFM(Modulation):
    """2·[α₁·CE + α₂·alignment] with α from the fitted schedule (official) or learnt per epoch (balancebenchmark)."""

    def __init__(
        self,
        variant: LFMVariant = LFMVariant.official,
        time_scale: TimeScale = TimeScale.raw,
        fit_epochs: PositiveInt = 200,
        run_epochs: Optional[PositiveInt] = None,
        clamp: bool = True,
        lr_alpha: NonNegativeFloat = 1e-4,
        halve_every: PositiveInt = 20,
        probe_samples: PositiveInt = 8,
    ):
        self.variant, self.time_scale = LFMVariant(variant), TimeScale(time_scale)
        self.fit_epochs, self.run_epochs, self.clamp = int(fit_epochs), run_epochs, bool(clamp)
        self.lr_alpha, self.halve_every, self.probe_samples = float(lr_alpha), int(halve_every), int(probe_samples)
        if self.time_scale is TimeScale.stretch and not run_epochs:
            raise ValueError(
                "modulation.time_scale=stretch needs modulation.run_epochs (the run's epoch count; "
                "conf/modulation/lfm.yaml sets it to ${trainer.epochs})"
            )
        # α = (α_cls, α_align); balancebenchmark starts at (0.95, 0.05) and learns α_align
        self.alpha = (
            (fitted_alpha(0.0, self.clamp), 1 - fitted_alpha(0.0, self.clamp))
            if self.variant is LFMVariant.official
            else (0.95, 0.05)
        )
        self.hvp: Optional[float] = None  # balancebenchmark: the last α gradient (for the log)

    def setup(self, model, num_classes: int) -> None:
        if model.head.num_classes < 2:
            raise ValueError(
                "modulation=lfm trains with cross-entropy and softmax alignment: it needs a "
                "classification head (task=classification)"
            )
        if len(model.modalities) < 2:
            raise ValueError("modulation=lfm aligns modality pairs: the model needs at least two modalities")

    def schedule_time(self, epoch: int) -> float:
        if self.time_scale is TimeScale.stretch:
            return self.fit_epochs * epoch / self.run_epochs
        return float(epoch)

    @staticmethod
    def _unimodal(head, feats) -> list[torch.Tensor]:
        estimator = Estimator.natural if head.natural_estimator else Estimator.zero_out
        return list(head.unimodal_logits(feats, estimator).values())

    def epoch_start(self, ctx: StepContext) -> None:
        if self.variant is LFMVariant.official:
            a1 = fitted_alpha(self.schedule_time(ctx.epoch), self.clamp)
            self.alpha = (a1, 1 - a1)
        else:
            self._learn_alpha(ctx)

    def _learn_alpha(self, ctx: StepContext) -> None:
        """BalanceBenchmark's update: on the first ``probe_samples`` of the first val batch (model in train mode),
        g = mean of the first parameter's entries of H(L_total)·∇CE; α_align <- clip(α_align - lr_α·g, .05, .95),
        lr_α halved at every ``halve_every``-th epoch (cumulatively)."""
        model = ctx.model
        inputs, labels = next(iter(ctx.batches("val", 1)))
        n = min(self.probe_samples, labels.shape[0])
        inputs = {k: v[:n] for k, v in inputs.items()}
        labels = labels[:n]
        was_training = model.training
        model.train()
        feats = model.encode(inputs)
        ce = F.cross_entropy(model.head(feats), labels)
        total = self.alpha[0] * ce + self.alpha[1] * pairwise_alignment(self._unimodal(model.head, feats))
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
        ce_grads = torch.autograd.grad(ce, params, create_graph=True, allow_unused=True)
        used = [(g, v) for g, v in zip(grads, ce_grads) if g is not None and v is not None and g.requires_grad]
        (hvp,) = torch.autograd.grad(
            [g for g, _ in used], params[0], grad_outputs=[v for _, v in used], allow_unused=True
        )
        model.train(was_training)
        g = 0.0 if hvp is None else float(hvp.mean())
        if ctx.epoch % self.halve_every == 0 and ctx.epoch != 0:
            self.lr_alpha /= 2
        align = min(max(self.alpha[1] - self.lr_alpha * g, 0.05), 0.95)
        self.alpha, self.hvp = (1 - align, align), g

    def after_forward(self, ctx: StepContext) -> None:
        a_cls, a_align = self.alpha
        unimodal = self._unimodal(ctx.model.head, ctx.features)
        align = pairwise_alignment(unimodal)
        # official: its model predicts ½(o_a + o_v), the mean of the uni-modal logits = the fused logits / M for a
        # concat or sum head; balancebenchmark: the head's fused logits
        scale = 1 / len(unimodal) if self.variant is LFMVariant.official else 1.0
        ce = F.cross_entropy(ctx.logits * scale, ctx.labels)
        ctx.loss_weight = 0.0  # the fused CE is replaced by the weighted one
        ctx.extra_losses["lfm_ce"] = 2 * a_cls * ce
        ctx.extra_losses["lfm_align"] = 2 * a_align * align
        device = ctx.labels.device
        ctx.metrics["lfm_alpha1"] = torch.tensor(a_cls, device=device)
        ctx.metrics["lfm_alpha2"] = torch.tensor(a_align, device=device)
        ctx.metrics["lfm_align"] = align.detach()
        ctx.metrics["lfm_ce"] = ce.detach()

    def state_dict(self) -> dict:
        return {"alpha": list(self.alpha), "lr_alpha": self.lr_alpha, "hvp": self.hvp}

    def load_state_dict(self, state: dict) -> None:
        if "alpha" in state:
            self.alpha = tuple(state["alpha"])
            self.lr_alpha, self.hvp = state["lr_alpha"], state.get("hvp")
