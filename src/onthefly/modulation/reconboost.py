"""ReconBoost (Hua, Xu, Bao, Yang, Huang; ICML 2024), docs/method.md §12.

Training runs in stages; stage s boosts one modality m (audio, visual, audio, ... in turn) and then reconciles:

* boost(m), ``boost_epochs`` epochs, its own optimizer over encoder m and the shared classifier H: learner
  f_m = H(z_m) is fitted with a cross-entropy weighted down where the ensemble of the other learners is already
  right, ℓ = -(w1 - w2·p̃(y))/K · log softmax(f_m)(y) with p̃ = softmax(β Σ_{j≠m} f_j) (no gradient), plus a
  reconcilement term α·MSE(softmax(f_m), softmax(f_prev)) towards the learner boosted in the previous stage;
* rectify, ``rectify_epochs`` epochs, a fresh optimizer over the ensemble members' encoders, H and β: the
  ensemble F = β Σ_{m∈E} f_m is trained with plain cross-entropy (the default joint step: F is the head).

E holds the modalities boosted so far (each learner is the latest version of its network). The head
(:class:`EnsembleHead`) computes F, so evaluation, best.pt and the analyses predict with the ensemble.
"""

from __future__ import annotations

import enum
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range, configurable
from onthefly.models.fusion import FusionHead
from onthefly.modulation.base import EpochSchedule, JointStep, Modulation, StepContext, StepStrategy
from onthefly.modulation.helpers import require_one_width


class Variant(str, enum.Enum):
    paper = "paper"  # the reconcilement term has a gradient (through the boosted learner's prediction)
    released = "released"  # the official code: both of its inputs are detached, so it changes nothing


RECTIFY = "rectify"


class StageSchedule(EpochSchedule):
    """Epoch -> stage and phase: each stage is ``boost`` epochs of ``boost_<m>`` then ``rectify`` epochs of
    ``rectify``; stage s boosts modality s mod M."""

    def __init__(self, modalities: list[str], boost: int, rectify: int):
        self.modalities, self.boost, self.rectify = list(modalities), int(boost), int(rectify)

    def stage(self, epoch: int) -> int:
        return epoch // (self.boost + self.rectify)

    def boosted(self, epoch: int) -> Optional[str]:
        """The modality boosted in ``epoch`` (None in a rectify epoch)."""
        if epoch % (self.boost + self.rectify) >= self.boost:
            return None
        return self.modalities[self.stage(epoch) % len(self.modalities)]

    def members(self, epoch: int) -> list[str]:
        """The ensemble's modalities during ``epoch``: those boosted in this stage or before."""
        stage = self.stage(epoch)
        return [m for i, m in enumerate(self.modalities) if i <= stage]

    def previous(self, epoch: int) -> Optional[str]:
        """The modality boosted in the stage before (None in stage 0)."""
        stage = self.stage(epoch)
        return self.modalities[(stage - 1) % len(self.modalities)] if stage > 0 else None

    def phase(self, epoch: int) -> str:
        m = self.boosted(epoch)
        return RECTIFY if m is None else f"boost_{m}"


class EnsembleHead(FusionHead):
    """F = β Σ_{m∈E} H(z_m): one classifier H (Linear, ReLU, Linear) shared by every modality's learner, a
    learnt scale β, and the members E (a buffer, saved with the model). Uni-modal logits: the learners H(z_m)."""

    natural_estimator = "learner"

    def __init__(self, feature_dims, num_classes: int, hidden: int = 256, boost_rate: float = 1.0):
        super().__init__(feature_dims, num_classes)
        width = require_one_width(feature_dims, "ReconBoost", "")
        self.classifier = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.boost_rate = nn.Parameter(torch.tensor(float(boost_rate)))
        self.register_buffer("members", torch.zeros(len(feature_dims)))  # 1: in the ensemble

    def natural_unimodal(self, feats):
        return {m: self.classifier(feats[m]) for m in self.modalities}

    def forward(self, feats):
        # masked rather than skipped: no host sync, and every parameter is in the graph (DDP)
        return self.boost_rate * sum(self.members[i] * self.classifier(feats[m]) for i, m in enumerate(self.modalities))

    def set_members(self, members: list[str]) -> None:
        self.members.copy_(torch.tensor([float(m in members) for m in self.modalities]))


def boosting_loss(
    logits: torch.Tensor, labels: torch.Tensor, p_others: Optional[torch.Tensor], w1: float, w2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over the batch of -(w1 - w2·p̃(y))/K · log softmax(f)(y), the mean weight (w1 - w2·p̃(y))).
    ``p_others``: the other learners' ensemble probabilities [B, K], or None when there is none (then p̃(y) = 1,
    as the official code's empty ensemble gives)."""
    k = logits.shape[1]
    p_y = torch.ones_like(labels, dtype=logits.dtype) if p_others is None else p_others.gather(1, labels[:, None])[:, 0]
    weight = w1 - w2 * p_y
    log_p = torch.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
    return -(weight * log_p).mean() / k, weight.mean()


def reconcilement(logits: torch.Tensor, previous: torch.Tensor, variant: Variant | str) -> torch.Tensor:
    """MSE between the boosted learner's probabilities and the previous learner's (mean over batch and classes);
    ``released``: both detached (no gradient, as the official code)."""
    p = torch.softmax(logits, dim=1)
    if Variant(variant) is Variant.released:
        p = p.detach()
    return F.mse_loss(p, torch.softmax(previous, dim=1).detach())


class BoostStep(StepStrategy):
    """Boost epochs: the boosted learner's loss (one backward reaching encoder m and H). Rectify epochs: the
    default joint step, whose head is the ensemble."""

    def __init__(self, method: ReconBoost):
        self.method, self.joint = method, JointStep()

    def run(self, trainer, ctx: StepContext) -> dict:
        m = self.method.stages.boosted(ctx.epoch)
        if m is None:
            return self.joint.run(trainer, ctx)
        loss = trainer.forward(ctx, lambda c: self.method.boost_loss(c, m))
        trainer.backward(loss)
        trainer.after_backward(ctx)
        return trainer.update(ctx, loss)


@configurable("modulation")
class ReconBoost(Modulation):
    """Alternating boosting of one modality's learner and reconcilement of the ensemble (docs/method.md §12)."""

    def __init__(
        self,
        variant: Variant = Variant.paper,
        boost_epochs: PositiveInt = 4,
        rectify_epochs: NonNegativeInt = 4,
        w1: float = 5.0,
        w2: float = 1.0,
        ga_weight: NonNegativeFloat = 0.5,
        boost_rate: float = 1.0,
        hidden: PositiveInt = 256,
        boost_lr: PositiveFloat = 0.01,
        rectify_lr: PositiveFloat = 0.01,
        weight_decay: Optional[NonNegativeFloat] = 5e-4,
        lr_decay: Annotated[float, Range(gt=0, le=1)] = 0.1,
        lr_decay_every: Optional[PositiveInt] = 30,
    ):
        self.variant = Variant(variant)
        self.boost_epochs, self.rectify_epochs = int(boost_epochs), int(rectify_epochs)
        self.w1, self.w2, self.ga_weight = float(w1), float(w2), float(ga_weight)
        self.boost_rate, self.hidden = float(boost_rate), int(hidden)
        self.boost_lr, self.rectify_lr, self.weight_decay = float(boost_lr), float(rectify_lr), weight_decay
        self.lr_decay, self.lr_decay_every = float(lr_decay), lr_decay_every
        self.head: Optional[EnsembleHead] = None
        self.stages: Optional[StageSchedule] = None

    def setup(self, model, num_classes: int) -> None:
        if len(model.modalities) < 2:
            raise ValueError(
                f"ReconBoost boosts one modality against the others; this model has only "
                f"{model.modalities} (use modulation=none for a uni-modal run)"
            )
        device = next(model.parameters()).device
        model.head = EnsembleHead(model.feature_dims, num_classes, self.hidden, self.boost_rate).to(device)
        self.head = model.head
        self.stages = StageSchedule(model.modalities, self.boost_epochs, self.rectify_epochs)
        self.head.set_members(self.stages.members(0))

    def schedule(self) -> EpochSchedule:
        return self.stages

    def step_strategy(self) -> StepStrategy:
        return BoostStep(self)

    def lr_scale(self, epoch: int) -> float:
        every = self.lr_decay_every
        return self.lr_decay ** (self.stages.stage(epoch) // every) if every else 1.0

    def param_groups(self, model, extra, epoch: int):
        """Boost: encoder m and H at boost_lr. Rectify: the members' encoders, H and β at rectify_lr. Both times
        ``lr_decay`` per ``lr_decay_every`` stages."""
        m = self.stages.boosted(epoch)
        if m is not None:
            params, lr = [*model.encoders[m].parameters(), *self.head.classifier.parameters()], self.boost_lr
        else:
            params = [p for j in self.stages.members(epoch) for p in model.encoders[j].parameters()]
            params += [*self.head.classifier.parameters(), self.head.boost_rate]
            lr = self.rectify_lr
        group = {"params": [p for p in params if p.requires_grad], "lr": lr * self.lr_scale(epoch)}
        if self.weight_decay is not None:
            group["weight_decay"] = float(self.weight_decay)
        return [group]

    def epoch_start(self, ctx: StepContext) -> None:
        self.head.set_members(self.stages.members(ctx.epoch))

    def boost_loss(self, ctx: StepContext, m: str) -> torch.Tensor:
        """The boost phase's loss for modality m (runs inside the trainer's forward)."""
        encoders, head, labels = ctx.model.encoders, self.head, ctx.labels
        f_m = head.classifier(encoders[m](ctx.inputs[m]))
        with torch.no_grad():  # the other learners, as the official code runs them (train mode, no gradient)
            others = {j: head.classifier(encoders[j](ctx.inputs[j])) for j in self.stages.members(ctx.epoch) if j != m}
            ensemble = head.boost_rate * sum(others.values()) if others else None
        loss, mean_weight = boosting_loss(
            f_m, labels, None if ensemble is None else torch.softmax(ensemble, 1), self.w1, self.w2
        )
        ctx.metrics["boost_loss"] = loss.detach()
        ctx.metrics["boost_weight"] = mean_weight.detach()
        previous = self.stages.previous(ctx.epoch)
        if previous in others and self.ga_weight:
            ga = reconcilement(f_m, others[previous], self.variant)
            ctx.metrics["reconcile"] = ga.detach()
            loss = loss + self.ga_weight * ga
        ctx.metrics[f"acc_{m}"] = (f_m.detach().argmax(1) == labels).float().mean()
        ctx.logits = f_m.detach() * head.boost_rate.detach() + (ensemble if ensemble is not None else 0)
        return loss
