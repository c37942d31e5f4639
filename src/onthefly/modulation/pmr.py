"""PMR, Prototypical Modal Rebalance (Fan et al., CVPR 2023; docs/method.md, "Zoo methods, part 1a").

Each modality keeps one prototype per class (the mean encoder feature of that class over a tenth of the training
batches, recomputed before every epoch in eval mode). A sample's prototype logits are its negative Euclidean
distances to the prototypes; their cross-entropy (PCE) is added, with weight α, for the modality whose
prototype score S_m (batch sum of the true-class softmax) is below the best one, pushing the lagging modality's
encoder only.
"""

from __future__ import annotations

import math
from typing import Annotated, Dict, Optional

import torch
import torch.nn.functional as F

from onthefly.config import NonNegativeFloat, NonNegativeInt, Probability, Range, configurable
from onthefly.modulation.base import EpochWindow, Modulation, StepContext
from onthefly.modulation.ogm import Scope, modulate_gradients, select_parameters
from onthefly.modulation.zoo import Variant, mean_over_ranks


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """ℓ_ik = -‖φ_i - c_k‖₂ (Euclidean, not squared), in float32; the prototypes are constants."""
    return -torch.cdist(features.float(), prototypes.detach().float())


def class_means(sums: torch.Tensor, counts: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-class mean features from per-class sums [K, d] and counts [K]; a class with no sample keeps its previous
    prototype (zeros when there is none), never 0/0."""
    means = sums / counts.clamp_min(1).unsqueeze(1)
    if previous is None:
        return means
    return torch.where((counts > 0).unsqueeze(1), means, previous.to(means))


def prototype_scores(logits: Dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """S_m = Σ_i softmax(ℓ^m_i)[y_i] (a batch sum), [M] float32, no gradient."""
    return torch.stack([torch.softmax(z.detach().float(), 1).gather(1, labels[:, None]).sum() for z in logits.values()])


def others_best(scores: torch.Tensor) -> torch.Tensor:
    """max_{j≠m} S_j for each m."""
    m = scores.shape[0]
    off = ~torch.eye(m, dtype=torch.bool, device=scores.device)
    return scores.unsqueeze(0).expand(m, m).masked_fill(~off, float("-inf")).amax(1)


def pmr_coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """β_m = α where S_m is below the best modality's score, else 0. For two modalities this is the released rule
    (ρ = S_a/S_v > 1 → β_v = α, ρ < 1 → β_a = α, ρ = 1 → none); for more it boosts every lagging modality."""
    return torch.where(scores < scores.max(), torch.full_like(scores, alpha), torch.zeros_like(scores))


@configurable("modulation")
class PMR(Modulation):
    """Prototype cross-entropy on the lagging modality (``variant=official``); ``variant=balancebenchmark`` adds,
    for three or more modalities, BalanceBenchmark's OGM-GE-like rule instead (k_m = 1 - tanh(η r_m) with
    r_m = S_m / min_j S_j, plus Gaussian noise, on every >1-D encoder tensor). Two modalities: both alike."""

    def __init__(
        self,
        alpha: NonNegativeFloat = 1.0,
        momentum: Probability = 0.2,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = 100,
        proto_fraction: Annotated[float, Range(gt=0, le=1)] = 0.1,
        variant: Variant = Variant.official,
        eta: NonNegativeFloat = 0.01,
    ):
        self.alpha, self.momentum, self.fraction = float(alpha), float(momentum), float(proto_fraction)
        self.window = EpochWindow(start, end)
        self.variant, self.eta = Variant(variant), float(eta)
        self.prototypes: Optional[Dict[str, torch.Tensor]] = None
        self.num_classes = 0
        self.params: dict = {}

    def setup(self, model, num_classes: int) -> None:
        self.num_classes = num_classes
        self.ogm_rule = self.variant is Variant.balancebenchmark and len(model.modalities) > 2
        if self.ogm_rule:
            self.params = {m: select_parameters(enc, Scope.all) for m, enc in model.encoders.items()}

    # --- the prototype pass, before each epoch ---------------------------------------------------------------
    @torch.no_grad()
    def epoch_start(self, ctx: StepContext) -> None:
        model, k = ctx.model, self.num_classes
        n = max(1, math.floor(ctx.num_batches("train") * self.fraction + 1e-9))
        was_training = model.training
        model.eval()  # BatchNorm statistics stay as they are
        sums, counts = None, torch.zeros(k, device=ctx.device)
        for inputs, labels in ctx.batches("train", n):
            feats = model.encode(inputs)
            labels = labels.long()
            if sums is None:
                sums = {m: torch.zeros(k, feats[m].shape[1], device=ctx.device) for m in ctx.modalities}
            for m in ctx.modalities:
                sums[m].index_add_(0, labels, feats[m].float())
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
        model.train(was_training)
        if sums is None:
            return
        old = self.prototypes
        new = {m: class_means(sums[m], counts, None if old is None else old[m]) for m in ctx.modalities}
        # the released code blends with the previous prototypes from the pass after the second epoch on (the
        # passes before epochs 0 and 1 are fresh)
        if old is not None and ctx.epoch >= 2 and self.momentum:
            new = {m: (1 - self.momentum) * new[m] + self.momentum * old[m].to(new[m]) for m in new}
        self.prototypes = new

    # --- each step ---------------------------------------------------------------------------------------------
    def after_forward(self, ctx: StepContext) -> None:
        if self.prototypes is None:
            return
        labels = ctx.labels.long()
        logits = {
            m: prototype_logits(ctx.features[m], self.prototypes[m].to(ctx.features[m].device)) for m in ctx.modalities
        }
        scores = prototype_scores(logits, labels)
        pce = torch.stack([F.cross_entropy(z, labels) for z in logits.values()])
        active = ctx.epoch in self.window
        if active and not self.ogm_rule:
            beta = pmr_coefficients(scores, self.alpha)
            for i, m in enumerate(ctx.modalities):
                ctx.extra_losses[f"pmr_pce_{m}"] = beta[i] * pce[i]
        else:
            beta = torch.zeros_like(scores)
        self._scores = scores if active and self.ogm_rule else None
        ctx.log_per_modality("pmr_score", scores)
        ctx.log_per_modality("pmr_ratio", scores / others_best(scores).clamp_min(1e-12))
        ctx.log_per_modality("pmr_beta", beta)
        ctx.log_per_modality("pmr_pce", pce)
        ctx.log_per_modality(
            "pmr_protoacc", torch.stack([(z.argmax(1) == labels).float().mean() for z in logits.values()])
        )

    def after_backward(self, ctx: StepContext) -> None:
        scores = getattr(self, "_scores", None)
        if scores is None:
            return
        scores = mean_over_ranks(scores)  # every rank scales its (all-reduced) gradients alike
        ratio = scores / scores.min().clamp_min(1e-12)
        k = torch.where(ratio > 1, 1 - torch.tanh(self.eta * ratio), torch.ones_like(ratio))
        for i, m in enumerate(ctx.modalities):
            grads = [p.grad for p in self.params.get(m, []) if p.grad is not None]
            modulate_gradients(grads, k[i].to(grads[0].dtype) if grads else k[i], 1.0)
        ctx.log_per_modality("pmr_k", k)

    def state_dict(self) -> dict:
        return {"prototypes": None if self.prototypes is None else {m: c.cpu() for m, c in self.prototypes.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = state.get("prototypes")
