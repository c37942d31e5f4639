"""CentralNet (Vielzeuf et al., ECCV-W 2018): a central network that runs alongside the modalities' networks and
reads a weighted sum of their hidden states at every level (docs/method.md §10.2).

No official code exists; this is the pooled design (an assumption, docs/method.md §10.2): the taps are the global
averages of every ResNet18 stage (per clip for frames), so audio and visual grids never need to agree.

* ``CentralNetTaps`` (the interaction, no parameters): feature of modality m = [p_m^1; p_m^2; p_m^3; p_m^4]
  (what goes into the central net: OPM drops it, zero-out estimates with it), plus ``branch/<m>`` = p_m^4 = z_m,
  the branch classifier's input, which OPM leaves alone.
* ``CentralNetHead``: c^1 = g_1(Σ_m α_m^1 p_m^1); c^l = g_l(α_C^l c^{l−1} + Σ_m α_m^l p_m^l), l = 2, 3;
  c^4 = α_C^4 c^3 + Σ_m α_m^4 p_m^4; prediction o_C = W_C c^4 + b_C. g_l = Linear + BatchNorm1d + ReLU. The α
  are trainable scalars (init 1, no weight decay). Its training terms add β·CE(o_m) per modality for the branch
  classifiers o_m = W_m z_m + b_m.
"""

from __future__ import annotations

import enum
from typing import Dict, List, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.config import ConfigError, NonNegativeFloat, configurable
from onthefly.models.encoders import init_weights
from onthefly.models.fusion import FusionHead
from onthefly.models.interaction import Interaction


def branch_key(modality: str) -> str:
    return f"branch/{modality}"


@configurable("interaction", runtime=("encoders",))
class CentralNetTaps(Interaction):
    """Runs each encoder stage by stage and returns every stage's global average (see the module docstring)."""

    fusion_name = "centralnet"

    def __init__(self, encoders: Mapping[str, nn.Module]):
        super().__init__(encoders)
        channels = {m: tuple(enc.stage_channels) for m, enc in encoders.items()}
        if len(set(channels.values())) != 1:
            raise ConfigError(
                f"fusion=centralnet sums the modalities' taps level by level, so every encoder needs the "
                f"same stage widths; got {channels}. Give the encoders one backbone.width."
            )
        self.tap_channels = list(next(iter(channels.values())))
        self.feature_dims = {m: sum(self.tap_channels) for m in encoders}
        self.head_args = {"tap_channels": self.tap_channels}

    def forward(self, encoders, inputs, ctx=None):
        hs, frames = self.stems(encoders, inputs)
        out = {}
        for m, h in hs.items():
            taps = []
            for level in range(1, 5):
                h = encoders[m].stage(level, h)
                taps.append(encoders[m].pool(h, frames[m]))
            out[m] = torch.cat(taps, dim=1)
            out[branch_key(m)] = taps[-1]
        return out


class _Block(nn.Module):
    """g_l: Linear + BatchNorm1d + ReLU. A one-sample training batch uses the running statistics; estimate passes
    (``update_stats=False``) normalise with their own batch statistics without moving the running ones."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        h, bn = self.fc(x), self.bn
        batch_stats = self.training and h.shape[0] > 1
        if batch_stats and update_stats:
            return torch.relu(bn(h))
        return torch.relu(
            F.batch_norm(
                h,
                None if batch_stats else bn.running_mean,
                None if batch_stats else bn.running_var,
                bn.weight,
                bn.bias,
                training=batch_stats,
                eps=bn.eps,
            )
        )


class CentralEstimator(str, enum.Enum):
    central = "central"  # the central net re-run with the other modalities' taps zeroed (no grad)
    branch = "branch"  # the branch classifiers o_m


@configurable("fusion", runtime=("feature_dims", "num_classes", "tap_channels"))
class CentralNetHead(FusionHead):
    """The central network and the branch classifiers (see the module docstring)."""

    natural_estimator = "central"

    def __init__(
        self,
        feature_dims: Dict[str, int],
        num_classes: int,
        tap_channels: List[int],
        beta: NonNegativeFloat = 1.0,
        unimodal: CentralEstimator = CentralEstimator.central,
        alpha_init: float = 1.0,
    ):
        super().__init__(feature_dims, num_classes)
        self.tap_channels = [int(c) for c in tap_channels]
        if any(d != sum(self.tap_channels) for d in feature_dims.values()):
            raise ConfigError(
                f"CentralNetHead reads taps of widths {self.tap_channels}, but the features have "
                f"widths {feature_dims}; build it with fusion=centralnet"
            )
        levels, mods = len(self.tap_channels), len(self.modalities)
        self.beta, self.unimodal = float(beta), CentralEstimator(unimodal)
        self.blocks = nn.ModuleList([_Block(a, b) for a, b in zip(self.tap_channels[:-1], self.tap_channels[1:])])
        self.classifier = nn.Linear(self.tap_channels[-1], num_classes)
        self.branch = nn.ModuleDict({m: nn.Linear(self.tap_channels[-1], num_classes) for m in self.modalities})
        init_weights(self)
        self.alpha = nn.Parameter(torch.full((levels, mods), float(alpha_init)))  # α_m^l
        self.alpha_central = nn.Parameter(torch.full((levels - 1,), float(alpha_init)))  # α_C^l, l = 2..L

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.alpha, self.alpha_central]

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return list(self.branch[modality].parameters())

    def central(self, feats: Dict[str, torch.Tensor], update_stats: bool = True) -> torch.Tensor:
        taps = [feats[m].split(self.tap_channels, dim=1) for m in self.modalities]  # [M][L] of [B, C_l]
        c = None
        for level in range(len(self.tap_channels)):
            mixed = sum(self.alpha[level, i] * taps[i][level] for i in range(len(self.modalities)))
            if c is not None:
                mixed = mixed + self.alpha_central[level - 1] * c
            c = self.blocks[level](mixed, update_stats) if level < len(self.blocks) else mixed
        return self.classifier(c)

    def forward(self, feats):
        return self.central(feats)

    def branch_logits(self, feats) -> Dict[str, torch.Tensor]:
        return {m: self.branch[m](feats[branch_key(m)]) for m in self.modalities}

    def zero_out_unimodal(self, feats):
        """The central net with every other modality's taps zeroed, one pass per modality (so each pass normalises
        with its own batch statistics), the running statistics left as they are."""
        out = {}
        for keep in self.modalities:
            masked = {**feats, **{m: torch.zeros_like(feats[m]) for m in self.modalities if m != keep}}
            out[keep] = self.central(masked, update_stats=False)
        return out

    def natural_unimodal(self, feats):
        if self.unimodal is CentralEstimator.branch:
            return self.branch_logits(feats)
        return self.zero_out_unimodal(feats)

    def training_terms(self, ctx, task) -> None:
        """β·CE(o_m) for each branch classifier (on every sample: OPM's drops do not reach the branches), and the
        α per level in the step's log."""
        for m, logits in self.branch_logits(ctx.features).items():
            loss = task.loss(logits, ctx.labels, ctx.features).mean()
            ctx.extra_losses[f"centralnet_branch_{m}"] = self.beta * loss
            ctx.metrics[f"branch_loss_{m}"] = loss.detach()
            ctx.metrics[f"branch_acc_{m}"] = (task.class_logits(logits.detach()).argmax(1) == ctx.labels).float().mean()
        alpha = self.alpha.detach()
        for level in range(alpha.shape[0]):
            for i, m in enumerate(self.modalities):
                ctx.metrics[f"alpha{level + 1}_{m}"] = alpha[level, i]
            if level:
                ctx.metrics[f"alpha{level + 1}_central"] = self.alpha_central.detach()[level - 1]
