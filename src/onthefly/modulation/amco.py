"""AMCo, adaptive mask co-optimization (Zhou et al., ICASSP 2023), as BalanceBenchmark implements it; no code of
the authors was found (docs/method.md, "Zoo methods, part 1b").

A modality the model depends on is made harder to use by masking it, while a uni-modal loss on every modality
("co-optimization") keeps the masked one learning. The dependence test, after each step, for the next:
P = softmax over the M·K concatenated uni-modal logits, D_m = mean_i Σ_{k in m's block} P_ik; m is dependent
when D_m > σ. The mask share follows a curriculum p_t = sin(π/2·min(ε, l)/ε).

Variants:
    bb_fixed       the benchmark's semantics: the head becomes Linear*(Σ_m z̃_m), z̃_m the W-slice logits of m,
                   times a random class mask with ⌊p_t·K⌋ zeros where m is dependent; loss CE(z) + Σ_m CE(z̃_m);
                   l restarts at 0 each epoch and grows by epoch/10 a step (so nothing is masked in epoch 0 and
                   p_t = 1 after three steps of any later epoch). The benchmark expands its mask to shape (2, K),
                   which fails for every batch size but 2; here it is (1, K), broadcast over the batch. Needs a head
                   whose uni-modal logits add up to its output (concat, sum)
    feature        a paper-style reading: zero ⌊p_t·d_m⌋ random feature channels of a dependent modality (one mask
                   for the batch, fresh each step), uni-modal CE on the unmasked features, p_t on an epoch axis
                   (l = epoch + step / steps per epoch, ε = ``ramp_epochs``); works with any head
    bb_base_model  what the benchmark computes with its default model (the one of its README): the mask and the
                   flags are never applied and there is no Linear*, so the loss is CE(z) + Σ_m CE(z_m)
"""

from __future__ import annotations

import enum
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.config import Estimator, NonNegativeInt, PositiveFloat, Probability, configurable
from onthefly.models.fusion import ConcatFusion, FusionHead, SumFusion
from onthefly.modulation.base import EpochWindow, Modulation, StepContext

ADDITIVE_HEADS = (ConcatFusion, SumFusion)  # heads whose uni-modal logits add up to the fused output


class AMCoVariant(str, enum.Enum):
    bb_fixed = "bb_fixed"
    feature = "feature"
    bb_base_model = "bb_base_model"


def curriculum(l: float, eps: float) -> float:
    """p_t = sin(π/2 · min(ε, l)/ε)."""
    return math.sin(math.pi / 2 * min(eps, l) / eps)


def random_mask(size: int, zeros: int, generator: torch.Generator) -> torch.Tensor:
    """A (1, size) float mask with ``zeros`` zeros at random places (ones elsewhere), drawn on the CPU."""
    mask = torch.ones(size)
    mask[torch.randperm(size, generator=generator)[:zeros]] = 0.0
    return mask.view(1, size)


def dependence(unimodal: list[torch.Tensor]) -> torch.Tensor:
    """D [M]: each modality's block share of softmax over the concatenated uni-modal logits, averaged over the
    batch."""
    probs = torch.softmax(torch.cat([z.detach().float() for z in unimodal], 1), 1)
    return torch.stack([block.sum(1).mean() for block in probs.split([z.shape[1] for z in unimodal], 1)])


class MaskedSumHead(FusionHead):
    """Linear*(Σ_m z̃_m): a head whose uni-modal logits add up to its output (concat, sum), each optionally masked,
    then the benchmark's extra K→K linear layer. Masks (set by AMCo for a training step) act in training mode only;
    uni-modal logits are the wrapped head's."""

    def __init__(self, base: FusionHead):
        super().__init__(base.feature_dims, base.num_classes)
        self.base = base
        self.natural_estimator = base.natural_estimator
        self.star = nn.Linear(base.num_classes, base.num_classes)
        self.masks: Optional[Dict[str, torch.Tensor]] = None

    def masked_unimodal(self, feats) -> Dict[str, torch.Tensor]:
        z = self.base.natural_unimodal(feats)
        if self.training and self.masks is not None:
            z = {m: v * self.masks[m].to(v.dtype) if m in self.masks else v for m, v in z.items()}
        return z

    def forward(self, feats):
        return self.star(sum(self.masked_unimodal(feats).values()))

    def natural_unimodal(self, feats):
        return self.base.natural_unimodal(feats)

    def zero_out_unimodal(self, feats):
        return self.base.zero_out_unimodal(feats)


@configurable("modulation")
class AMCo(Modulation):
    """Mask the dependent modality (class logits or feature channels) + uni-modal co-optimization losses."""

    def __init__(
        self,
        variant: AMCoVariant = AMCoVariant.bb_fixed,
        sigma: Probability = 0.5,
        eps: PositiveFloat = 0.3,
        ramp_epochs: PositiveFloat = 3.0,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = 80,
    ):
        self.variant, self.sigma, self.eps = AMCoVariant(variant), float(sigma), float(eps)
        self.ramp_epochs = float(ramp_epochs)
        self.window = EpochWindow(start, end)
        self.l = 0.0  # the benchmark's curriculum counter (bb_fixed)
        self.flags: Optional[torch.Tensor] = None  # [M] bool: dependent modalities, from the last step's test
        self.steps_now, self.steps_prev = 0, 0  # feature: steps of this epoch and of the last full one
        self.seed = 0  # mask draws: generator seeded by (seed, global step), the same on every rank
        self.head: Optional[MaskedSumHead] = None
        self._step: dict = {}

    def setup(self, model, num_classes: int) -> None:
        if model.head.num_classes < 2:
            raise ValueError("modulation=amco needs a classification head (task=classification)")
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item())
        if self.variant is AMCoVariant.bb_fixed:
            if not isinstance(model.head, ADDITIVE_HEADS):
                raise ValueError(
                    f"modulation=amco variant bb_fixed masks the uni-modal logits that add up to the fused output; "
                    f"fusion head {type(model.head).__name__} has no such logits. Use fusion=concat or fusion=sum, "
                    "or modulation.variant=feature (masks feature channels, any head)."
                )
            self.head = model.head = MaskedSumHead(model.head)

    def epoch_start(self, ctx: StepContext) -> None:
        self.l, self.flags = 0.0, torch.zeros(len(ctx.modalities), dtype=torch.bool, device=ctx.device)
        if self.steps_now:
            self.steps_prev = self.steps_now
        self.steps_now = 0

    def _ratio(self, ctx: StepContext) -> float:
        """p_t for this step (and advance the counters)."""
        if self.variant is AMCoVariant.bb_fixed:
            p = curriculum(self.l, self.eps)
            self.l += ctx.epoch / 10
        else:
            frac = min(self.steps_now / self.steps_prev, 1.0) if self.steps_prev else 0.0
            p = curriculum(ctx.epoch + frac, self.ramp_epochs)
        self.steps_now += 1
        return p

    def before_forward(self, ctx: StepContext) -> None:
        self._step = {}
        if self.head is not None:
            self.head.masks = None
        if ctx.epoch not in self.window or self.variant is AMCoVariant.bb_base_model:
            return
        if self.flags is None:
            self.flags = torch.zeros(len(ctx.modalities), dtype=torch.bool, device=ctx.device)
        p = self._ratio(ctx)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.global_step)
        flags = self.flags.to(ctx.device)
        if self.variant is AMCoVariant.bb_fixed:
            k = self.head.num_classes
            zeros = int(p * k)
            mask = random_mask(k, zeros, gen).to(ctx.device)
            ones = torch.ones_like(mask)
            self.head.masks = {m: torch.where(flags[i], mask, ones) for i, m in enumerate(ctx.modalities)}
            self._step = {"p": p, "n": float(zeros), "flags": flags}
        else:
            dims = ctx.model.feature_dims
            masks = {m: random_mask(dims[m], int(p * dims[m]), gen).to(ctx.device) for m in ctx.modalities}
            self._step = {
                "p": p,
                "n": float(sum(int(p * dims[m]) for m in ctx.modalities)) / len(ctx.modalities),
                "flags": flags,
                "masks": masks,
            }

    def on_features(self, ctx: StepContext) -> None:
        if "masks" not in self._step:
            return
        flags, masks = self._step["flags"], self._step["masks"]
        self._step["unmasked"] = dict(ctx.features)
        ctx.features = {
            **ctx.features,
            **{
                m: ctx.features[m]
                * torch.where(flags[i], masks[m], torch.ones_like(masks[m])).to(ctx.features[m].dtype)
                for i, m in enumerate(ctx.modalities)
            },
        }

    def after_forward(self, ctx: StepContext) -> None:
        if ctx.epoch not in self.window:
            return
        head, mods, labels = ctx.model.head, ctx.modalities, ctx.labels
        if self.variant is AMCoVariant.bb_fixed:
            z = head.masked_unimodal(ctx.features)  # z̃_m, as the fused output saw them
        else:
            feats = self._step.get("unmasked", ctx.features)
            estimator = Estimator.natural if head.natural_estimator else Estimator.zero_out
            z = head.unimodal_logits(feats, estimator)
        ce = torch.stack([F.cross_entropy(z[m], labels) for m in mods])
        for m, loss in zip(mods, ce.unbind(0)):
            ctx.extra_losses[f"amco_uni_{m}"] = loss
        ctx.log_per_modality("amco_ce", ce)
        if self.variant is AMCoVariant.bb_base_model:
            return
        d = dependence([z[m] for m in mods])
        new = d > self.sigma
        ctx.log_per_modality("amco_D", d)
        ctx.log_per_modality("amco_flag", self._step["flags"].float())
        ctx.metrics["amco_flip"] = (new != self._step["flags"]).float().mean()
        ctx.metrics["amco_pt"] = torch.tensor(self._step["p"], device=labels.device)
        ctx.metrics["amco_masked"] = torch.tensor(self._step["n"], device=labels.device)
        self.flags = new
        if self.head is not None:
            self.head.masks = None  # the masks are this step's only

    def state_dict(self) -> dict:
        return {
            "l": self.l,
            "flags": self.flags,
            "steps_now": self.steps_now,
            "steps_prev": self.steps_prev,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.l, self.flags, self.seed = state["l"], state["flags"], state["seed"]
            self.steps_now, self.steps_prev = state["steps_now"], state["steps_prev"]
