"""The multimodal model: one encoder per modality (by name) and a fusion head."""
from __future__ import annotations

from typing import Dict

import torch
from hydra.utils import instantiate
from torch import nn

from onthefly.models.fusion import FusionHead


class MultimodalModel(nn.Module):
    def __init__(self, encoders: Dict[str, nn.Module], head: FusionHead):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = head

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    @property
    def feature_dims(self) -> Dict[str, int]:
        return {m: enc.out_dim for m, enc in self.encoders.items()}

    def encode(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {m: enc(inputs[m]) for m, enc in self.encoders.items()}

    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encode(inputs))


def build_model(cfg, modalities: list[str], num_classes: int) -> MultimodalModel:
    """Encoders from ``cfg.backbone.encoders[<modality>]``, the head from ``cfg.fusion``."""
    available = cfg.backbone.encoders
    missing = [m for m in modalities if m not in available]
    if missing:
        raise ValueError(
            f"backbone '{cfg.backbone.name}' has no encoder for modality {missing}; it has {list(available)}. "
            "Pick a backbone that covers the dataset's modalities (or add one in conf/backbone/)."
        )
    encoders = {m: instantiate(available[m]) for m in modalities}
    head = instantiate(cfg.fusion, feature_dims={m: e.out_dim for m, e in encoders.items()}, num_classes=num_classes)
    return MultimodalModel(encoders, head)
