"""Pieces several methods share, so that no method writes them again: per-loss gradients of a set of parameters,
and one linear uni-modal head per modality."""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence

import torch
from torch import nn


def loss_gradients(
    losses: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor], retain_graph: bool = True
) -> Dict[str, list[torch.Tensor]]:
    """{name: [∂loss/∂p for p in params]} for each named loss, in float32. A parameter a loss does not reach gets
    zeros (autograd's None). The graph is kept (``retain_graph``) so the step's own backward can still run; by
    linearity, the gradient of a sum of losses is the sum of these, so a method that needs the total needs no
    further backward pass."""
    params = list(params)
    out = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        out[name] = [
            torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() for p, g in zip(params, grads)
        ]
    return out


def flat(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """One vector of a list of gradient tensors (for norms and cosines)."""
    return torch.cat([g.reshape(-1) for g in grads])


def set_gradients(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """p.grad <- g (cast to the parameter's dtype), replacing whatever backward left there."""
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype).clone()


class UnimodalHeads(nn.ModuleDict):
    """One linear classifier per modality on its own features (auxiliary heads: G-Blending, UME, ...).
    ``heads(feats)`` -> {modality: logits}."""

    def __init__(self, feature_dims: Mapping[str, int], num_classes: int):
        super().__init__({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})

    def forward(self, feats: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {m: head(feats[m]) for m, head in self.items()}


def require_one_width(feature_dims: dict, method: str, hint: str = "") -> int:
    """The one feature width of every modality, which methods that share one classifier between modalities (MLA,
    ReconBoost) need; a model with several widths is refused with the fix."""
    widths = set(feature_dims.values())
    if len(widths) != 1:
        raise ValueError(
            f"{method} shares one classifier between modalities, so their feature widths must agree; "
            f"this model has {feature_dims}. Use encoders of one width{hint}."
        )
    return widths.pop()
