"""Typed config schemas, registered in Hydra's ConfigStore so a misspelt key or a wrong type fails at compose time.

Two kinds of schema live here:

* the top-level `Config` (trainer, logger, paths, discrepancy, seed, ...), written out as dataclasses;
* one schema per configurable class (a dataset, encoder, fusion head or modulation method), derived from the
  class's ``__init__`` signature by the :func:`configurable` decorator. The class's YAML file in ``conf/<group>/``
  names it in its defaults list (``defaults: [OGM_schema, _self_]``), so adding a method is one class and one
  YAML file, and the signature is the single place its options and defaults are written.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Packages whose import registers schemas (each module decorates its classes with @configurable).
_SCHEMA_MODULES = (
    "onthefly.data",
    "onthefly.models",
    "onthefly.modulation",
    "onthefly.tasks",
)


class Split(str, enum.Enum):
    val = "val"
    test = "test"


class Estimator(str, enum.Enum):
    """How uni-modal logits are read off a fusion head (METHOD.md §1)."""

    natural = "natural"  # the head's own estimator: W-slice + b/M (concat), per-branch (sum, FiLM, gated)
    zero_out = "zero_out"  # the head applied with every other modality's feature set to zero


class RhoReduce(str, enum.Enum):
    """How ρ_m is formed for M > 2 modalities (METHOD.md §2); all coincide for M = 2."""

    pairwise = "pairwise"
    min = "min"
    sum_others = "sum_others"


# trainer.precision: 32 (float32), bf16 (bfloat16 autocast) or fp16 (float16 autocast + GradScaler). The value of
# `32` is the int 32 so that `trainer.precision=32` (which Hydra reads as an int) matches it.
Precision = enum.Enum("Precision", [("32", 32), ("bf16", "bf16"), ("fp16", "fp16")], module=__name__)


class WandbMode(str, enum.Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class MetricWhen(str, enum.Enum):
    """When an imbalance metric is computed (docs/method.md §14)."""

    off = "off"
    test = "test"  # on the test split, at the end (the selected checkpoint)
    every_epoch = "every_epoch"  # also on val after every epoch (a curve in metrics.csv / W&B)


class SampleValue(str, enum.Enum):
    scaled = "scaled"  # v_i(S) = |S| * 1[correct] (the valuation method's per-sample value)
    correct = "correct"  # v_i(S) = 1[correct]


@dataclass
class ImbalanceConfig:
    """Imbalance and cost metrics of every run (onthefly.engine.imbalance, docs/method.md §14)."""

    shapley: MetricWhen = MetricWhen.every_epoch  # Shapley contribution per modality (cached features: head passes)
    sample_value: SampleValue = SampleValue.scaled  # per-sample value function of the sample-level Shapley value
    utilization: MetricWhen = MetricWhen.test  # conditional utilisation rate (one encoder pass over train each time)
    cost: bool = True  # parameters and FLOPs of one training step, counted once at start-up


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch intra-op threads on CPU (None: torch's default)
    # NHWC conv layout: auto = on for CUDA (tensor cores), off on CPU, where oneDNN's AVX-512 NHWC weight-gradient
    # kernel crashes on some conv shapes (README, troubleshooting); true forces it on any device, with a warning on CPU
    channels_last: str = "auto"  # auto | true | false
    modalities: Optional[List[str]] = None  # None: every modality of the dataset; [audio]: a uni-modal model
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    log_every_n_steps: int = 1
    select_on: Split = Split.val  # split that selects the checkpoint; `test` reproduces the official code
    eval_test: bool = True
    save_checkpoint: bool = True
    plots: bool = True  # ρ / k / q curves (plots/*.png, also to W&B) at the end of the run
    progress: bool = True
    deterministic: bool = True
    grad_clip: Optional[float] = None
    max_nonfinite_steps: int = 10  # steps with a NaN/Inf loss are skipped; past this many the run stops
    # --- speed (GPU path; the defaults change nothing on a CPU) ---
    precision: Precision = Precision["32"]  # 32 | bf16 (autocast) | fp16 (autocast + GradScaler, OGM sees unscaled grads)
    compile: bool = False  # torch.compile each encoder (in place: state_dict keys unchanged)
    compile_backend: str = "inductor"  # torch.compile backend (eager / aot_eager to debug a compile problem)
    pin_memory: bool = True  # page-locked host batches + non-blocking copies (only on CUDA)
    prefetch_factor: Optional[int] = None  # batches each worker loads ahead (None: torch's default); needs workers
    # --- data parallel (torchrun / Slurm tasks; ignored in a single process) ---
    sync_batchnorm: bool = True  # SyncBatchNorm across ranks (GPU only: BN statistics stay per rank on CPU/gloo)
    find_unused_parameters: bool = False  # DDP option, for a model with parameters some steps do not use
    # --- checkpoints and resume ---
    resume: str = "never"  # never | auto (newest valid checkpoint in the run folder) | path of a checkpoint file
    checkpoint_every_n_steps: Optional[int] = 500  # plus one at every epoch end; null: epoch ends only
    keep_checkpoints: int = 1  # newest N kept under <run>/checkpoints/; 0: write none (no resume possible)
    # --- what is measured besides the task's metrics ---
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)


@dataclass
class DiscrepancyConfig:
    estimator: Estimator = Estimator.natural
    reduce: RhoReduce = RhoReduce.pairwise


@dataclass
class LoggerConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "onthefly"
    entity: Optional[str] = None
    group: Optional[str] = None
    job_type: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    log_steps: bool = True  # per-step scalars (ρ, k, q, loss) to W&B and steps.csv


@dataclass
class PathsConfig:
    data_root: str = "${oc.env:ONTHEFLY_DATA,data}"
    output_root: str = "outputs"


@dataclass
class BackboneConfig:
    """A backbone is one encoder config (with `_target_`) per modality name (plus, under ``context``, one per
    context input); a model builds the ones it needs."""

    name: str = MISSING
    width: int = 64
    encoders: Dict[str, Any] = field(default_factory=dict)
    # encoders of context inputs (AVQA's question): encoded and given to the head, never balanced
    context: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    dataset: Any = MISSING
    task: Any = MISSING
    backbone: Any = MISSING
    fusion: Any = MISSING
    modulation: Any = MISSING
    optim: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    discrepancy: DiscrepancyConfig = field(default_factory=DiscrepancyConfig)
    seed: int = 0
    name: Optional[str] = None


# --- optimizer / scheduler schemas (torch classes, so written out here) -------------------------------------
@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    foreach: Optional[bool] = None  # multi-tensor update (faster; None: torch's default for the device)


@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    foreach: Optional[bool] = None


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-4  # L2 (coupled), as plain Adam does
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    foreach: Optional[bool] = None


@dataclass
class StepLRConfig:
    _target_: str = "torch.optim.lr_scheduler.StepLR"
    _partial_: bool = True
    step_size: int = 70
    gamma: float = 0.1


@dataclass
class ConstantLRConfig:
    _target_: str = "torch.optim.lr_scheduler.ConstantLR"
    _partial_: bool = True
    factor: float = 1.0
    total_iters: int = 0


# --- schemas derived from class signatures ---------------------------------------------------------------
def _field_for(name: str, annotation: Any, default: Any):
    if default is inspect.Parameter.empty:
        return (name, annotation, field(default=MISSING))
    if isinstance(default, (list, dict)):
        return (name, annotation, field(default_factory=lambda d=default: type(d)(d)))
    return (name, annotation, field(default=default))


def _schema_type(annotation: Any) -> Any:
    """Map an __init__ annotation to a type OmegaConf understands (a configurable class -> its schema)."""
    if isinstance(annotation, type) and hasattr(annotation, "Config") and dataclasses.is_dataclass(annotation.Config):
        return annotation.Config
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return Optional[_schema_type(args[0])]
        return Any
    if origin in (list, List):
        (arg,) = typing.get_args(annotation) or (Any,)
        return List[_schema_type(arg)]
    if origin in (dict, Dict):
        key, val = typing.get_args(annotation) or (str, Any)
        return Dict[key, _schema_type(val)]
    if annotation in (int, float, bool, str) or (isinstance(annotation, type) and issubclass(annotation, enum.Enum)):
        return annotation
    return Any


def configurable(group: str, *, runtime: tuple[str, ...] = ()):
    """Class decorator: derive a dataclass schema from ``__init__`` and store it as ``<group>/<Class>_schema``.

    ``runtime`` names arguments supplied by the code when the object is built (feature sizes, class counts),
    which are therefore not part of the config.
    """

    def decorate(cls):
        hints = typing.get_type_hints(cls.__init__)
        fields = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
        for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if name in runtime or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            fields.append(_field_for(name, _schema_type(hints.get(name, Any)), param.default))
        schema = dataclasses.make_dataclass(f"{cls.__name__}Config", fields)
        schema.__module__ = cls.__module__
        cls.Config = schema
        ConfigStore.instance().store(group=group, name=f"{cls.__name__}_schema", node=schema)
        return cls

    return decorate


_registered = False


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent). Call before composing."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="backbone", name="backbone_schema", node=BackboneConfig)
    cs.store(group="optim", name="SGD_schema", node=SGDConfig)
    cs.store(group="optim", name="AdamW_schema", node=AdamWConfig)
    cs.store(group="optim", name="Adam_schema", node=AdamConfig)
    cs.store(group="scheduler", name="StepLR_schema", node=StepLRConfig)
    cs.store(group="scheduler", name="ConstantLR_schema", node=ConstantLRConfig)
    for module in _SCHEMA_MODULES:
        importlib.import_module(module)
    _registered = True


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose the project config outside a Hydra app (tests, the demo, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
