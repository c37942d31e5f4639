"""The method interface: the one place where a method touches the training loop (docs/architecture.md).

Once, when the run is built (before the optimizer exists):
    setup(model, num_classes)   may wrap or replace ``model.head`` (then the saved model carries it, and evaluation
                                and the analyses see it), build auxiliary heads, check the model
    extra_module()              parameters the method owns and trains (auxiliary heads); None if none
    param_groups(model, extra, epoch)
                                the optimizer's parameter groups (None: every parameter, weight decay off for what
                                a module's ``no_weight_decay()`` names); asked again when the schedule's phase changes
    step_strategy()             how one training step runs (None: :class:`JointStep`, the paper's step)
    schedule()                  how epochs are shaped (None: every epoch alike, see :class:`EpochSchedule`)
    prerequisites()             plain runs to train first (UMT's uni-modal teachers): {name: {config key: value}}
    use_prerequisites(runs)     {name: finished run folder}, before training starts (also when it resumes)
Per epoch:
    train_start(ctx)            once before the very first epoch (not again after a resume)
    epoch_start(ctx)            before each epoch's first step (not when a run resumes in the middle of that epoch)
    epoch_end(ctx)              after each epoch's validation; scalars it writes into ctx.metrics join the epoch's
                                row (metrics.csv `train/<name>`)
    train_indices(epoch)        the training samples of the coming epoch (None: the whole train split once)
In each training step (the default step; a step strategy calls the same hooks through the trainer):
    before_forward(ctx)   inputs, labels and sample indices are set; may set ctx.keep / ctx.curation, which the
                          model's interaction module reads inside the forward (mid-fusion models)
    on_features(ctx)      encoder features, uni-modal logits, scores and ρ are set; may edit ctx.features
                          (OPM drops them), ctx.sample_weight (samples to leave out of the loss)
    after_forward(ctx)    fused logits are set; may add ctx.extra_losses and set ctx.loss_weight
    after_backward(ctx)   gradients are accumulated (and unscaled); may edit encoder gradients (OGM)
Hooks outside the step get ctx.batches: (split, max_batches=None, with_index=False) -> iterator of (inputs, labels
[, indices]) on the device, split one of train (augmented), train_eval (train with evaluation transforms, in
order), val, test; ctx.num_batches(split) says how many batches that yields. Hooks write per-step scalars (0-d
tensors, no host sync) into ctx.metrics under `<name>_<modality>`; the trainer logs them as
`train/<name>_<modality>`. A method's state_dict() must hold
everything its hooks change (a resumed run must equal an uninterrupted one).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Optional, Protocol, Sequence

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
    indices: Optional[torch.Tensor] = None  # the batch's sample indices in the train split
    features: Optional[Dict[str, torch.Tensor]] = None
    unimodal: Optional[Dict[str, torch.Tensor]] = None  # uni-modal logits from the undropped features (no grad)
    scores: Optional[torch.Tensor] = None  # [M] float32
    rho: Optional[torch.Tensor] = None  # [M] float32
    logits: Optional[torch.Tensor] = None
    sample_weight: Optional[torch.Tensor] = None
    loss_weight: Any = 1.0
    extra_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    batches: Optional[Callable[..., Iterator[tuple]]] = None
    num_batches: Optional[Callable[[str], int]] = None  # how many batches batches(split) yields (limits applied)
    phase: str = "train"  # the epoch's phase (EpochSchedule.phase)
    steps_in_epoch: Optional[int] = None  # the epoch's number of training steps (schedules within an epoch)
    train_size: Optional[int] = None  # N, the number of samples in the train split (tagged train_indices)
    # runs a block on an RNG stream that every data-parallel rank shares (one draw per global batch; in one
    # process: the global stream, unchanged)
    shared_rng: Callable[[], ContextManager] = contextlib.nullcontext
    # (s_m, ρ_m) of given features as the loop computes them (estimator, task, ρ reduction, scores summed over
    # ranks), differentiable w.r.t. the features with the head's weights held fixed (None outside a training step)
    discrepancy_of: Optional[Callable[[Dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]] = None
    # what a method hands the model for this step's forward (set in before_forward; model.encode reads them):
    keep: Optional[torch.Tensor] = None  # [B, M] bool: modalities kept per sample (OPM inside a mid-fusion model);
    #                                      samples with a dropped modality are left out of the scores and ρ
    curation: Optional[str] = None  # the modality whose branch this step curates (Greedy; None: a regular step)

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


class StepTrainer(Protocol):
    """What a step strategy may ask of the trainer (onthefly.engine.trainer.Trainer implements it)."""

    modulation: Modulation

    def forward(self, ctx: StepContext, fn: Optional[Callable[[StepContext], torch.Tensor]] = None) -> torch.Tensor:
        """Run ``fn(ctx)`` (default: the joint forward with the method's forward hooks, returning the loss) as the
        differentiable part of a step: inside DDP's module call, under autocast, on this rank's RNG stream."""

    def backward(self, loss: torch.Tensor) -> None:
        """Zero the gradients, back-propagate (scaled under fp16, then unscaled), clip."""

    def after_backward(self, ctx: StepContext) -> None:
        """The method's after_backward hook, on the RNG stream shared by all ranks."""

    def update(self, ctx: StepContext, loss: torch.Tensor) -> dict:
        """Record the step's scalars (one host sync), skip a non-finite step, else take the optimizer step."""


class StepStrategy(abc.ABC):
    """How one training step runs. The trainer calls ``run`` once per batch and logs what it returns (the dict of
    :meth:`StepTrainer.update`)."""

    @abc.abstractmethod
    def run(self, trainer: StepTrainer, ctx: StepContext) -> dict: ...


class JointStep(StepStrategy):
    """The paper's step: one forward of every modality (with the forward hooks), one backward, after_backward,
    one optimizer step."""

    def run(self, trainer: StepTrainer, ctx: StepContext) -> dict:
        loss = trainer.forward(ctx)
        trainer.backward(loss)
        trainer.after_backward(ctx)
        return trainer.update(ctx, loss)


class EpochSchedule:
    """How a method shapes the epochs: each epoch belongs to a named phase (logged in metrics.csv). When the phase
    changes, the trainer asks the method for new parameter groups (``param_groups``) and rebuilds the optimizer and
    the scheduler, also when it resumes there. The default: one phase, ``train``."""

    def phase(self, epoch: int) -> str:
        return "train"


def default_param_groups(modules: Sequence[Optional[nn.Module]]) -> list[dict]:
    """Every trainable parameter of ``modules`` in one group, except those a submodule names in its
    ``no_weight_decay()`` (e.g. a learnt mixing weight), which get their own group with weight decay 0."""
    params, exempt = [], set()
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            if hasattr(sub, "no_weight_decay"):
                exempt.update(id(p) for p in sub.no_weight_decay())
        params += [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in exempt]}]
    if exempt:
        groups.append({"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class Modulation:
    """Base class: every hook does nothing. Subclasses override the hooks they need."""

    needs_rho = False  # True: the loop must compute uni-modal logits and ρ every step (fails if it cannot)

    def setup(self, model: nn.Module, num_classes: int) -> None:
        """Called once with the built model, before the optimizer is made."""

    def extra_module(self) -> Optional[nn.Module]:
        return None

    def param_groups(self, model: nn.Module, extra: Optional[nn.Module], epoch: int) -> Optional[list[dict]]:
        """The optimizer's parameter groups for ``epoch`` (options in a group override cfg.optim); None: default."""
        return None

    def step_strategy(self) -> Optional[StepStrategy]:
        return None

    def schedule(self) -> Optional[EpochSchedule]:
        return None

    def prerequisites(self) -> Dict[str, Dict[str, Any]]:
        """Runs this method needs before it trains (e.g. UMT's uni-modal teachers): {name: {dotted config key:
        value}}. Each is a plain run (modulation none) of this run's config with those changes, trained in
        ``<run>/prerequisites/<name>/`` (an interrupted one resumes, a finished one is reused). Asked after
        ``setup``."""
        return {}

    def use_prerequisites(self, runs: Dict[str, Any]) -> None:
        """{name: folder of the finished run} for :meth:`prerequisites`; called before training starts, also when
        the run resumes (read what you need from best.pt with ``weights_only=True``)."""

    def train_indices(self, epoch: int) -> Optional[Iterable[int]]:
        """The train-split indices of ``epoch``, repeats allowed (None: every sample once). Must follow from the
        method's state, so that a resumed run rebuilds the same loader. To tell its repeats apart, a method may tag
        an entry: ``i + k * N`` (N the split's size, k >= 0) reads sample i, and the step sees ``i + k * N`` in
        ``ctx.indices`` (each tagged copy also gets its own augmentation draw)."""
        return None

    def train_start(self, ctx: StepContext) -> None: ...

    def epoch_start(self, ctx: StepContext) -> None: ...

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
