"""CML, Calibrating Multimodal Learning (Ma et al., ICML 2023): the model's confidence must not rise when a
modality is taken away (docs/method.md, "Zoo methods, part 1b").

Each sample gets a removal chain: level 0 is the full input, level j has j modalities removed (zeroed features,
one head-only pass per level; the encoders run once). The loss averages the cross-entropy over the M levels and
adds λ times a hinge on every confidence increase from a level to the next (``confidence_hinge``).

Variants:
    official           the authors' code (CPM-Nets release): a random removal order per sample; per-sample hinge
                       ReLU((conf_{j+1} - conf_j)·σ - ε) summed over the batch, with the sign mask σ = 0 where the
                       reduced input is right and the fuller one wrong (that increase is allowed), else 1
    balancebenchmark   BalanceBenchmark's trainer: one removal order per epoch for every sample; the hinge
                       max(0, Σ_i (conf_{j+1} - conf_j)) on the batch sum, no sign mask, no margin
"""

from __future__ import annotations

import enum
import itertools
from typing import Optional

import torch
import torch.nn.functional as F

from onthefly.config import NonNegativeFloat, NonNegativeInt, configurable
from onthefly.modulation.base import EpochWindow, Modulation, StepContext


class CMLVariant(str, enum.Enum):
    official = "official"
    balancebenchmark = "balancebenchmark"


def confidence_hinge(
    fuller: torch.Tensor,
    reduced: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float = 0.0,
    variant: CMLVariant | str = CMLVariant.official,
) -> tuple[torch.Tensor, dict]:
    """The penalty on a confidence increase from ``fuller`` logits to ``reduced`` logits (one removal step).

    official: Σ_i ReLU((conf_r,i - conf_f,i)·σ_i - ε), σ_i = 0 if the reduced input predicts y_i and the fuller
    one does not, else 1. balancebenchmark: max(0, Σ_i (conf_r,i - conf_f,i)). Returns (penalty, diagnostics:
    per-sample ``violation`` 1[conf_r > conf_f] and ``sigma``)."""
    conf_f, pred_f = torch.softmax(fuller.float(), 1).max(1)
    conf_r, pred_r = torch.softmax(reduced.float(), 1).max(1)
    sigma = (~((pred_r == labels) & (pred_f != labels))).float()
    if CMLVariant(variant) is CMLVariant.official:
        penalty = F.relu((conf_r - conf_f) * sigma - epsilon).sum()
    else:
        penalty = (conf_r - conf_f).sum().clamp_min(0)
    return penalty, {
        "violation": (conf_r > conf_f).float().detach(),
        "sigma": sigma,
        "conf_full": conf_f.detach(),
        "conf_partial": conf_r.detach(),
    }


def removal_positions(batch: int, order: Optional[torch.Tensor], modalities: int, device) -> torch.Tensor:
    """[B, M]: the chain level at which each sample loses each modality (0 = removed first). ``order`` (a permutation
    of the modality indices, the first removed first) gives every sample the same chain; None draws one per sample."""
    if order is None:
        return torch.rand(batch, modalities, device=device).argsort(1).argsort(1)
    return order.argsort().to(device).expand(batch, modalities)


def partial_logits(head, feats: dict, modalities: list[str], positions: torch.Tensor) -> list[torch.Tensor]:
    """Logits of chain levels 1..M-1 (level j zeroes the features a sample loses at positions < j), in one head
    pass over the levels stacked along the batch. Entries that are not modalities (a question) are repeated."""
    levels = range(1, len(modalities))
    batch = positions.shape[0]
    stacked = {}
    for i, m in enumerate(modalities):
        keep = torch.cat([(positions[:, i] >= j) for j in levels]).to(feats[m].dtype)
        stacked[m] = torch.cat([feats[m]] * len(levels)) * keep.view(-1, *([1] * (feats[m].dim() - 1)))
    stacked.update({k: torch.cat([v] * len(levels)) for k, v in feats.items() if k not in stacked})
    return list(head(stacked).split(batch))


@configurable("modulation")
class CML(Modulation):
    """Cross-entropy averaged over the removal chain + λ·(confidence hinge), inside the epoch window."""

    def __init__(
        self,
        lam: NonNegativeFloat = 0.1,
        epsilon: NonNegativeFloat = 0.0,
        variant: CMLVariant = CMLVariant.official,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = None,
    ):
        self.lam, self.epsilon, self.variant = float(lam), float(epsilon), CMLVariant(variant)
        self.window = EpochWindow(start, end)
        self.order: Optional[torch.Tensor] = None  # balancebenchmark: this epoch's removal order

    def setup(self, model, num_classes: int) -> None:
        if model.head.num_classes < 2:
            raise ValueError(
                "modulation=cml penalises softmax confidences: it needs a classification head "
                "(task=classification or sentiment with head=classification)"
            )

    def epoch_start(self, ctx: StepContext) -> None:
        if self.variant is CMLVariant.balancebenchmark:
            self.order = torch.randperm(len(ctx.modalities))

    def after_forward(self, ctx: StepContext) -> None:
        if ctx.epoch not in self.window:
            return
        mods, labels = ctx.modalities, ctx.labels
        if self.variant is CMLVariant.balancebenchmark and self.order is None:  # resumed before any epoch_start
            self.order = torch.randperm(len(mods))
        order = self.order if self.variant is CMLVariant.balancebenchmark else None
        positions = removal_positions(labels.shape[0], order, len(mods), labels.device)
        chain = [ctx.logits, *partial_logits(ctx.model.head, ctx.features, mods, positions)]
        ce_partial = torch.stack([F.cross_entropy(z, labels) for z in chain[1:]])
        rank, diag = torch.zeros((), device=labels.device), []
        for fuller, reduced in itertools.pairwise(chain):
            penalty, d = confidence_hinge(fuller, reduced, labels, self.epsilon, self.variant)
            rank, diag = rank + penalty, diag + [d]
        ctx.loss_weight = ctx.loss_weight / len(mods)  # the fused CE is the chain's level 0
        ctx.extra_losses["cml_ce_partial"] = ce_partial.sum() / len(mods)
        ctx.extra_losses["cml_rank"] = self.lam * rank
        ctx.metrics["cml_rank"] = rank.detach()
        ctx.metrics["cml_ce_partial"] = ce_partial.detach().mean()
        for key in ("violation", "sigma", "conf_partial"):
            ctx.metrics[f"cml_{key}"] = torch.stack([d[key].mean() for d in diag]).mean()
        ctx.metrics["cml_conf_full"] = diag[0]["conf_full"].mean()
        ctx.log_per_modality("cml_removed", (positions == 0).float().mean(0))  # share removed first

    def state_dict(self) -> dict:
        return {"order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.order = state.get("order")
