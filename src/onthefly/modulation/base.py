"""The hook interface: the one place where a method touches the training loop.

The loop calls, in each training step:
    before_forward(ctx)   inputs and labels are set
    on_features(ctx)      encoder features, uni-modal logits, scores and ρ are set; may edit ctx.features
                          (OPM drops them), ctx.sample_weight (samples to leave out of the loss)
    after_forward(ctx)    fused logits are set; may add ctx.extra_losses and set ctx.loss_weight
    after_backward(ctx)   gradients are accumulated (and unscaled); may edit encoder gradients (OGM)
train_start(ctx) once before the first epoch and epoch_end(ctx) after each epoch have ctx.batches set (a
function (split, max_batches) -> iterator of (inputs, labels) on the device). Hooks write per-step scalars (0-d tensors,
no host sync) into ctx.metrics under `<name>_<modality>`; the loop logs them as `train/<name>_<modality>`.
A method that owns parameters returns them as a module from `extra_module()`; the loop trains them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import nn

from onthefly.config import configurable


@dataclass
class StepContext:
    epoch: int
    step: int
    global_step: int
    model: nn.Module
    modalities: list[str]
    device: torch.device = torch.device("cpu")
    inputs: Optional[Dict[str, torch.Tensor]] = None
    labels: Optional[torch.Tensor] = None
    features: Optional[Dict[str, torch.Tensor]] = None
    unimodal: Optional[Dict[str, torch.Tensor]] = None  # uni-modal logits from the undropped features (no grad)
    scores: Optional[torch.Tensor] = None  # [M] float32
    rho: Optional[torch.Tensor] = None  # [M] float32
    logits: Optional[torch.Tensor] = None
    sample_weight: Optional[torch.Tensor] = None
    loss_weight: Any = 1.0
    extra_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    batches: Optional[Callable[[str, Optional[int]], Iterator[tuple[Dict[str, torch.Tensor], torch.Tensor]]]] = None

    def log_per_modality(self, name: str, values: torch.Tensor) -> None:
        for m, v in zip(self.modalities, values.detach().unbind(0)):
            self.metrics[f"{name}_{m}"] = v


@dataclass
class EpochWindow:
    """Active when warmup_epochs <= epoch and start <= epoch <= end (inclusive; end None: no end)."""

    start: int = 0
    end: Optional[int] = None
    warmup_epochs: int = 0

    def __contains__(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs and epoch >= self.start and (self.end is None or epoch <= self.end)


class Modulation:
    """Base class: every hook does nothing. Subclasses override the hooks they need."""

    needs_rho = False  # True: the loop must compute uni-modal logits and ρ every step (fails if it cannot)

    def setup(self, model: nn.Module, num_classes: int) -> None:
        """Called once with the built model, before the optimizer is made."""

    def extra_module(self) -> Optional[nn.Module]:
        return None

    def train_start(self, ctx: StepContext) -> None: ...

    def before_forward(self, ctx: StepContext) -> None: ...

    def on_features(self, ctx: StepContext) -> None: ...

    def after_forward(self, ctx: StepContext) -> None: ...

    def after_backward(self, ctx: StepContext) -> None: ...

    def epoch_end(self, ctx: StepContext) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


@configurable("modulation")
class NoModulation(Modulation):
    """Plain joint training."""

    def __init__(self):
        pass
