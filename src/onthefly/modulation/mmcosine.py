"""MMCosine, the multi-modal cosine loss (Xu et al., ICASSP 2023; docs/method.md, "Zoo methods, part 1a").

The fusion head's logits are replaced by a sum of per-modality cosine logits, z = s·Σ_m ⟨φ_m/‖φ_m‖, w_{m,k}/‖w_{m,k}‖⟩
(w_{m,k}: row k of the head's block for modality m, no bias), so no modality can dominate the fused logits through
the size of its features or weights. The head is wrapped in ``setup``: training, best.pt, evaluation and the
analyses all predict with the cosine logits. An optional supervised contrastive term (λ·NCE, off by default)
pulls same-class features of two modalities together.
"""

from __future__ import annotations

import itertools
from typing import Dict

import torch
import torch.nn.functional as F

from onthefly.config import ConfigError, NonNegativeFloat, PositiveFloat, configurable
from onthefly.models.fusion import ConcatFusion, FusionHead, SumFusion
from onthefly.modulation.base import Modulation, StepContext

NCE_EPS = 1e-10  # inside the logarithms of the contrastive term (as released)


def cosine_logits(feats: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """s·normalize(φ)·normalize(W)ᵀ: [B, d] features, [K, d] class rows -> [B, K]."""
    return scale * F.normalize(feats, dim=1) @ F.normalize(weight, dim=1).t()


class CosineHead(FusionHead):
    """A concat or sum head whose logits are s·Σ_m cosine(φ_m, rows of W_m); its biases are frozen (unused).
    Uni-modal logits: each modality's cosine term (zeroing a modality's feature removes exactly its term)."""

    natural_estimator = "cosine"

    def __init__(self, inner: FusionHead, scale: float):
        super().__init__(inner.feature_dims, inner.num_classes)
        if not isinstance(inner, (ConcatFusion, SumFusion)):
            raise ConfigError(
                f"MMCosine normalises the per-modality blocks of a linear fusion head; {type(inner).__name__} has "
                "none. Use fusion=concat (as released) or fusion=sum."
            )
        self.inner, self.scale = inner, float(scale)
        for bias in self._biases():
            bias.requires_grad_(False)

    def _biases(self):
        if isinstance(self.inner, ConcatFusion):
            return [self.inner.fc.bias]
        return [self.inner.fc[m].bias for m in self.modalities]

    def weights(self) -> Dict[str, torch.Tensor]:
        """W_m: the [K, d_m] block of the head acting on modality m."""
        if isinstance(self.inner, ConcatFusion):
            blocks = self.inner.fc.weight.split([self.feature_dims[m] for m in self.modalities], dim=1)
            return dict(zip(self.modalities, blocks))
        return {m: self.inner.fc[m].weight for m in self.modalities}

    def natural_unimodal(self, feats):
        return {m: cosine_logits(feats[m], w, self.scale) for m, w in self.weights().items()}

    def forward(self, feats):
        return sum(self.natural_unimodal(feats).values())


def supervised_nce(f1: torch.Tensor, f2: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The released supplementary contrastive term between two modalities' features: p = softmax over j of
    cos(f1_i, f2_j)/τ; each i averages −log p over same-label j and −log(1 − p) over other-label j. A sample with no
    other-label partner in the batch adds nothing for that half (the released code divides by zero there)."""
    cos = F.normalize(f1.float(), dim=1) @ F.normalize(f2.float(), dim=1).t()
    p = torch.softmax(cos / temperature, dim=1)
    same = (labels[:, None] == labels[None, :]).float()
    pos = (-torch.log(p + NCE_EPS) * same).sum(1) / same.sum(1).clamp_min(1)
    neg = (-torch.log(1 - p + NCE_EPS) * (1 - same)).sum(1) / (1 - same).sum(1).clamp_min(1)
    return (pos + neg).mean()


@configurable("modulation")
class MMCosine(Modulation):
    """Cosine logits with scale s (a head wrapper) and, when ``nce_weight`` > 0, λ·NCE averaged over modality pairs."""

    def __init__(
        self, scale: PositiveFloat = 10.0, nce_weight: NonNegativeFloat = 0.0, nce_temperature: PositiveFloat = 0.1
    ):
        self.scale, self.nce_weight, self.temperature = float(scale), float(nce_weight), float(nce_temperature)

    def setup(self, model, num_classes: int) -> None:
        if not isinstance(model.head, CosineHead):
            model.head = CosineHead(model.head, self.scale)

    def after_forward(self, ctx: StepContext) -> None:
        head, labels = ctx.model.head, ctx.labels.long()
        if self.nce_weight > 0 and len(ctx.modalities) > 1:
            pairs = list(itertools.combinations(ctx.modalities, 2))
            nce = sum(supervised_nce(ctx.features[a], ctx.features[b], labels, self.temperature) for a, b in pairs)
            ctx.extra_losses["mmcosine_nce"] = self.nce_weight * nce / len(pairs)
        with torch.no_grad():
            feats = {m: ctx.features[m].detach() for m in ctx.modalities}
            uni = head.natural_unimodal(feats)
            weights = head.weights()
            ctx.log_per_modality(
                "mmcosine_logit",
                torch.stack([uni[m].float().gather(1, labels[:, None]).mean() for m in ctx.modalities]),
            )
            ctx.log_per_modality(
                "mmcosine_featnorm", torch.stack([feats[m].float().norm(dim=1).mean() for m in ctx.modalities])
            )
            ctx.log_per_modality(
                "mmcosine_wnorm", torch.stack([weights[m].float().norm(dim=1).mean() for m in ctx.modalities])
            )
