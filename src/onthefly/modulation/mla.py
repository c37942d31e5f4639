"""MLA: Multimodal Learning with Alternating Unimodal Adaptation (Zhang, Yoon, Bansal, Yao; CVPR 2024),
docs/method.md §11.

Each batch is learnt one modality at a time through one classifier shared by all modalities: for m in turn, the
loss CE(h(z_m), y) is back-propagated (it reaches encoder m and h only) and the optimizer steps, so a batch makes
M updates. Between backward and step the gradient of h's weight is multiplied by a projector P (kept across
modalities and batches) so that learning one modality disturbs less what h learnt from the others. At
evaluation the modalities' logits h(z_m) are mixed with weights from their prediction entropies (confident
modalities count more); the mixing lives in the head (:class:`SharedHead`), so the saved model and the analyses
predict the same way.
"""

from __future__ import annotations

import enum
from typing import Annotated, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.config import PositiveInt, Range, configurable
from onthefly.models.encoders import init_weights
from onthefly.models.fusion import FusionHead
from onthefly.modulation.base import Modulation, StepContext, StepStrategy
from onthefly.modulation.helpers import require_one_width
from onthefly.modulation.zoo import mean_over_ranks


class Variant(str, enum.Enum):
    paper = "paper"  # the head-gradient projection on (its form: `projection`)
    released = "released"  # the official code as it runs: its projection never fires (a parameter-name guard), so none


class Projection(str, enum.Enum):
    owm = "owm"  # ∇W·P with P built from the features of the earlier sub-steps, then P updated (no normalisation)
    code = "code"  # what the official plug-in would do if it ran: P updated with the current features, ‖P‖_F = 1, ∇W·P
    additive = "additive"  # the benchmark's version: as `code`, but ∇W + ∇W·P


class Fusion(str, enum.Enum):
    dynamic = "dynamic"  # entropy weights per sample (softmax over classes), as the paper's figure shows
    dynamic_batch = "dynamic_batch"  # the official code: softmax over the batch, one weight per modality per batch
    fixed = "fixed"  # fixed weights (`fixed_weights`)


# --- the math, on plain tensors ---------------------------------------------------------------------------------
def owm_update(P: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """P - (P r)(P r)ᵀ / (α + rᵀ P r): P deflated along the feature r (recursive least-squares form)."""
    k = P @ r
    return P - torch.outer(k, k) / (alpha + r @ k)


def step_alpha(base: float, step: int, steps_in_epoch: Optional[int]) -> float:
    """α_t = base^(1 + b / N_b): from base at an epoch's first batch towards base² at its last."""
    return base ** (1.0 + (step / steps_in_epoch if steps_in_epoch else 0.0))


def entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    p = torch.softmax(logits, dim=dim)
    return -(p * torch.log_softmax(logits, dim=dim)).sum(dim)


def fusion_weights(
    logits: Sequence[torch.Tensor], fusion: Fusion | str, fixed: Optional[Sequence[float]] = None, batch: int = 64
) -> torch.Tensor:
    """[B, M] weights λ of each modality's logits u_m. ``dynamic``: λ_{i,m} = exp(max_j e_{i,j} - e_{i,m}) /
    Σ_k exp(max_j e_{i,j} - e_{i,k}) with e_{i,m} the entropy of softmax(u_{i,m}) over classes. ``dynamic_batch``:
    the same with e_m the entropy of the softmax over the samples of each run of ``batch`` rows (summed over
    samples and classes), one weight per modality per run. ``fixed``: ``fixed`` (None: 1/M each)."""
    fusion, b, m_count = Fusion(fusion), logits[0].shape[0], len(logits)
    if fusion is Fusion.fixed:
        w = torch.tensor(
            fixed if fixed is not None else [1.0 / m_count] * m_count, dtype=logits[0].dtype, device=logits[0].device
        )
        return w.expand(b, m_count)
    if fusion is Fusion.dynamic:
        e = torch.stack([entropy(u.float(), 1) for u in logits], dim=1)  # [B, M]
        return torch.softmax(-e, dim=1).to(logits[0].dtype)  # = exp(max e - e_m) / Σ exp(max e - e_k)
    out = []
    for start in range(0, b, batch):
        e = torch.stack([entropy(u[start : start + batch].float(), 0).sum() for u in logits])  # [M]
        out.append(torch.softmax(-e, dim=0).expand(min(batch, b - start), m_count))
    return torch.cat(out).to(logits[0].dtype)


class SharedHead(FusionHead):
    """One linear classifier h shared by every modality (all feature widths must agree). Uni-modal logits:
    u_m = h(z_m); fused logits: Σ_m λ_m u_m with the fusion rule's weights."""

    natural_estimator = "shared"

    def __init__(
        self,
        feature_dims: Dict[str, int],
        num_classes: int,
        fusion: Fusion = Fusion.dynamic,
        fixed_weights: Optional[Sequence[float]] = None,
        fusion_batch: int = 64,
    ):
        super().__init__(feature_dims, num_classes)
        width = require_one_width(feature_dims, "MLA", " (e.g. backbone=resnet18)")
        if fixed_weights is not None and len(fixed_weights) != len(feature_dims):
            raise ValueError(
                f"modulation.fixed_weights has {len(fixed_weights)} values for "
                f"{len(feature_dims)} modalities {list(feature_dims)}"
            )
        self.fc = nn.Linear(width, num_classes)
        self.fusion, self.fixed_weights, self.fusion_batch = Fusion(fusion), fixed_weights, int(fusion_batch)
        init_weights(self)

    def natural_unimodal(self, feats):
        return {m: self.fc(feats[m]) for m in self.modalities}

    def forward(self, feats):
        logits = [self.fc(feats[m]) for m in self.modalities]
        w = fusion_weights([u.detach() for u in logits], self.fusion, self.fixed_weights, self.fusion_batch)
        return sum(w[:, i : i + 1] * u for i, u in enumerate(logits))


class AlternatingStep(StepStrategy):
    """One uni-modal sub-step per modality through the shared head: forward of encoder m and h, backward,
    head-gradient projection, optimizer step. Logs loss_<m>, acc_<m> and the fused accuracy."""

    def __init__(self, method: MLA):
        self.method = method

    def run(self, trainer, ctx: StepContext) -> dict:
        head, feats, values, losses = self.method.head, {}, {}, []
        for i, m in enumerate(ctx.modalities):
            last = i == len(ctx.modalities) - 1
            ctx.metrics, ctx.logits = {}, None

            def unimodal_loss(c: StepContext, m=m, last=last) -> torch.Tensor:
                z = c.model.encoders[m](c.inputs[m])
                feats[m] = z.detach()
                u = head.fc(z)
                c.metrics[f"acc_{m}"] = (u.detach().argmax(1) == c.labels).float().mean()
                if last:  # the fused prediction of this batch (for train/acc)
                    with torch.no_grad():
                        c.logits = head(feats)
                return F.cross_entropy(u, c.labels)

            loss = trainer.forward(ctx, unimodal_loss)
            trainer.backward(loss)
            self.method.modify_head_gradient(feats[m], ctx)
            out = trainer.update(ctx, loss)
            losses.append(out.pop("loss"))
            values[f"loss_{m}"] = losses[-1]
            values.update(out)
        values["loss"] = sum(losses) / len(losses)
        return values


@configurable("modulation")
class MLA(Modulation):
    """Alternating uni-modal sub-steps through a shared head, with head-gradient projection and entropy-weighted
    fusion at evaluation (docs/method.md §11)."""

    def __init__(
        self,
        variant: Variant = Variant.paper,
        projection: Projection = Projection.owm,
        alpha: Annotated[float, Range(gt=0, le=1)] = 0.1,
        fusion: Fusion = Fusion.dynamic,
        fixed_weights: Optional[List[float]] = None,
        fusion_batch: PositiveInt = 64,
    ):
        self.variant, self.projection = Variant(variant), Projection(projection)
        self.alpha, self.fusion, self.fusion_batch = float(alpha), Fusion(fusion), int(fusion_batch)
        self.fixed_weights = None if fixed_weights is None else [float(w) for w in fixed_weights]
        self.head: Optional[SharedHead] = None
        self.P: Optional[torch.Tensor] = None
        self.count = 0  # sub-steps taken so far (the official plug-in leaves the very first one alone)

    def setup(self, model, num_classes: int) -> None:
        if len(model.modalities) < 2:
            raise ValueError(
                "MLA alternates between modalities; this model has only "
                f"{model.modalities} (use modulation=none for a uni-modal run)"
            )
        device = next(model.parameters()).device
        model.head = SharedHead(model.feature_dims, num_classes, self.fusion, self.fixed_weights, self.fusion_batch).to(
            device
        )
        self.head = model.head
        self.P = torch.eye(self.head.fc.in_features, device=device)

    def step_strategy(self) -> StepStrategy:
        return AlternatingStep(self)

    @torch.no_grad()
    def modify_head_gradient(self, z: torch.Tensor, ctx: StepContext) -> None:
        """Project the shared head's weight gradient (variant paper); logs α_t and trace(P)."""
        weight = self.head.fc.weight
        if self.variant is Variant.paper and weight.grad is not None:
            r = mean_over_ranks(z.float().mean(0))  # every rank updates P alike
            alpha = step_alpha(self.alpha, ctx.step, ctx.steps_in_epoch)
            g = weight.grad.float()
            if self.projection is Projection.owm:
                g = g @ self.P.t()
                self.P = owm_update(self.P, r, alpha)
            elif self.count > 0:  # code / additive: the official order, skipping the very first sub-step
                self.P = owm_update(self.P, r, alpha)
                self.P = self.P / self.P.norm()
                g = g @ self.P.t() if self.projection is Projection.code else g + g @ self.P.t()
            weight.grad.copy_(g)
            ctx.metrics["mla_alpha"] = torch.tensor(alpha)
            ctx.metrics["mla_trace_p"] = self.P.trace()
        self.count += 1

    def state_dict(self) -> dict:
        return {"P": self.P, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state.get("P") is not None:
            self.P = state["P"].to(self.P.device if self.P is not None else state["P"].device)
        self.count = int(state.get("count", 0))
