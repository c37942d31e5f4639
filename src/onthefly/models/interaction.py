"""Interaction modules: where the modalities' encoders exchange information before the head (mid-fusion).

A mid-fusion model keeps the structure of every other model, ``model.encoders[m]`` + ``model.interaction`` +
``model.head``, so a method still finds each modality's own parameters by structure (OGM scales
``model.encoders[m]``), and the parameters through which the modalities interact are the interaction module's,
never a modality's (docs/method.md §10).

An interaction runs the encoders itself, stage by stage (the ResNet18 stage API: ``fold``, ``stage(0..4)``,
``pool``), and returns the dict ``MultimodalModel.encode`` returns: one feature tensor per modality (what the
head fuses and what OPM drops), plus any side entries the head reads (``branch/<m>``: CentralNet's branch
features). It receives the training step's context ``ctx`` (None at evaluation), the one argument through which a
method reaches inside the forward (OPM's keep masks ``ctx.keep``, Greedy's curated branch ``ctx.curation``).

What an interaction declares, for the methods to read:

* ``feature_dims`` — the width of each modality's feature (what the head is built for);
* ``head_args`` — extra build arguments its head needs (CentralNet's tap widths);
* ``reads_keep_masks`` — True when it applies OPM's keep masks inside the forward (MMTM), so OPM draws them before
  the forward;
* ``shares_parameters`` — True when the modalities' paths share parameters (a shared transformer), so OGM scales
  the gradient of each modality's feature instead of parameter gradients;
* ``modality_parameters(m)`` / ``shared_parameters()`` — its parameters that act on modality m alone / on several.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from onthefly.config import ConfigError


def check_staged(encoders: Mapping[str, nn.Module], fusion: str, min_modalities: int = 2) -> None:
    """Refuse encoders without the ResNet18 stage API, or too few modalities, with a message that says what to do."""
    if len(encoders) < min_modalities:
        raise ConfigError(
            f"fusion={fusion} makes {min_modalities} or more modalities interact, but the model has only "
            f"{list(encoders)}; use a late-fusion head (fusion=concat) for uni-modal runs."
        )
    for m, enc in encoders.items():
        if not all(hasattr(enc, a) for a in ("fold", "stage", "pool", "stage_channels")):
            raise ConfigError(
                f"fusion={fusion} runs the encoders stage by stage (ResNet18: stem, layer1..layer4), but the {m!r} "
                f"encoder is {type(enc).__name__}, which has no stages; use backbone=resnet18 or resnet18_small "
                "(or a late-fusion head such as fusion=concat for this encoder)."
            )


class Interaction(nn.Module):
    """Base class (see the module docstring). Subclasses set ``feature_dims`` and implement ``forward``."""

    fusion_name = "interaction"
    reads_keep_masks = False
    shares_parameters = False

    def __init__(self, encoders: Mapping[str, nn.Module]):
        super().__init__()
        check_staged(encoders, self.fusion_name)
        self.modalities = list(encoders)
        self.feature_dims: Dict[str, int] = {}
        self.head_args: Dict[str, Any] = {}

    @staticmethod
    def stems(encoders, inputs) -> tuple[dict, dict]:
        """({m: stem output on the folded batch}, {m: frames per clip})."""
        hs, frames = {}, {}
        for m, enc in encoders.items():
            x, frames[m] = enc.fold(inputs[m])
            hs[m] = enc.stage(0, x)
        return hs, frames

    def forward(self, encoders, inputs: Dict[str, Any], ctx: Optional[Any] = None) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return []

    def shared_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for m in self.modalities for p in self.modality_parameters(m)}
        return [p for p in self.parameters() if id(p) not in own]
