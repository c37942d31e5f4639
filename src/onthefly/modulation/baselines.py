"""Baselines the paper compares against (docs/method.md §6): modality dropout and online Gradient-Blending.

Uni-modal models need no method: `trainer.modalities=[audio]` builds a one-encoder model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.config import PositiveInt, Probability, configurable
from onthefly.modulation.base import Modulation, StepContext
from onthefly.modulation.helpers import UnimodalHeads


@configurable("modulation")
class ModalityDropout(Modulation):
    """Zero one named modality's features for each sample with a fixed probability p (CVPR 2022 Table 2).

    ``modality`` None drops the model's first modality (audio for audio-visual data, rgb for UCF-101)."""

    def __init__(self, modality: Optional[str] = None, p: Probability = 0.5, rescale: bool = False):
        self.modality, self.p, self.rescale = modality, float(p), rescale

    def setup(self, model, num_classes: int) -> None:
        self.modality = self.modality or model.modalities[0]
        if self.modality not in model.encoders:
            raise ValueError(
                f"modulation.modality={self.modality!r} is not a modality of this model ({list(model.encoders)})"
            )

    def on_features(self, ctx: StepContext) -> None:
        feat = ctx.features[self.modality]
        keep = torch.rand(feat.shape[0], 1, device=feat.device) >= self.p
        scale = 1 / (1 - self.p) if self.rescale and self.p < 1 else 1.0
        ctx.features = {**ctx.features, self.modality: torch.where(keep, feat * scale, torch.zeros_like(feat))}


@configurable("modulation")
class GradientBlending(Modulation):
    """Online Gradient-Blending (Wang et al., CVPR 2020).

    Each modality gets an auxiliary linear head on its features; the loss is w_fused·L_fused + Σ_m w_m·L_m.
    Every ``super_epoch`` epochs the weights are re-estimated from the change in each head's train and held-out
    (val) losses since the last estimate: w_k ∝ G_k / O_k², with G_k the drop in val loss and O_k the change in
    the overfitting gap (val − train loss); weights are normalised to sum to 1 (uniform at the start).
    """

    def __init__(self, super_epoch: PositiveInt = 1, max_batches: Optional[PositiveInt] = 20):
        self.super_epoch, self.max_batches = super_epoch, max_batches
        self.aux: Optional[nn.ModuleDict] = None
        self.weights: Optional[torch.Tensor] = None
        self.snapshot: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def setup(self, model, num_classes: int) -> None:
        self.heads = ["fused", *model.encoders]
        self.aux = UnimodalHeads(model.feature_dims, num_classes)
        self.weights = torch.full((len(self.heads),), 1.0 / len(self.heads))

    def extra_module(self) -> nn.Module:
        return self.aux

    def after_forward(self, ctx: StepContext) -> None:
        w = self.weights.to(ctx.device)
        ctx.loss_weight = w[0]
        for i, m in enumerate(ctx.modalities, start=1):
            ctx.extra_losses[f"gb_{m}"] = w[i] * F.cross_entropy(self.aux[m](ctx.features[m]), ctx.labels)
        ctx.log_per_modality("gbw", w[1:])

    @torch.no_grad()
    def _losses(self, ctx: StepContext, split: str) -> torch.Tensor:
        model = ctx.model
        was_training = model.training
        model.eval()
        total, n = torch.zeros(len(self.heads), device=ctx.device), 0
        for inputs, labels in ctx.batches(split, self.max_batches):
            feats = model.encode(inputs)
            logits = [model.head(feats)] + [self.aux[m](feats[m]) for m in self.heads[1:]]
            total += torch.stack([F.cross_entropy(z, labels, reduction="sum") for z in logits])
            n += len(labels)
        model.train(was_training)
        return total / max(n, 1)

    def train_start(self, ctx: StepContext) -> None:
        self.snapshot = (self._losses(ctx, "train"), self._losses(ctx, "val"))

    def epoch_end(self, ctx: StepContext) -> None:
        if (ctx.epoch + 1) % self.super_epoch:
            return
        train, val = self._losses(ctx, "train"), self._losses(ctx, "val")
        prev_train, prev_val = self.snapshot
        gain = (prev_val - val).clamp_min(0)
        overfit_change = (val - train) - (prev_val - prev_train)
        w = gain / (overfit_change**2 + 1e-8)
        if float(w.sum()) > 0:
            self.weights = (w / w.sum()).cpu()
        self.snapshot = (train, val)

    def state_dict(self) -> dict:
        return {"weights": self.weights, "snapshot": self.snapshot}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.snapshot = state.get("weights", self.weights), state.get("snapshot")
