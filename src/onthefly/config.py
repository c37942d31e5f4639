"""Typed config schemas, registered in Hydra's ConfigStore so a misspelt key or a wrong type fails at compose time,
and checked by :func:`validate` so a value that cannot work (a batch size of 0, a probability of 1.5) fails
before any work, with one line naming the key, the value and what is allowed.

Two kinds of schema live here:

* the top-level `Config` (trainer, logger, paths, discrepancy, seed, ...) and the optimizer / scheduler schemas,
  written out as dataclasses;
* one schema per configurable class (a dataset, encoder, fusion head, modulation method or task), derived from
  the class's ``__init__`` signature by the :func:`configurable` decorator. The class's YAML file in
  ``conf/<group>/`` names it in its defaults list (``defaults: [/OGM_schema@_here_, _self_]``), so adding a
  method is one class and one YAML file, and the signature is the single place its options and defaults are
  written.

Schemas are stored at the root of the ConfigStore (``OGM_schema``), not in the option groups, so they are never
offered as options (``modulation=OGM_schema`` does not compose and ``--help`` does not list them).

What a value may be is carried by its type: ``Annotated[float, Range(ge=0)]``, ``Annotated[str, Choice(...)]``
(aliases below: ``Probability``, ``PositiveInt``, ...), in the dataclasses here and in the ``__init__``
signatures of configurable classes alike; OmegaConf sees the plain type, :func:`validate` reads the rest. The
same annotations carry :data:`MAY_CHANGE_ON_RESUME`, the flag of a setting that may differ between a run and its
resume (how it runs, not what it computes).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from onthefly.engine.errors import TrainingError
from onthefly.resources import CONF_DIR  # noqa: F401  (the configs: conf/ in a checkout, packaged in a wheel)

# Packages whose import registers schemas (each module decorates its classes with @configurable).
_SCHEMA_MODULES = (
    "onthefly.data",
    "onthefly.models",
    "onthefly.modulation",
    "onthefly.tasks",
)


# --- what a value may be: metadata carried by the types ------------------------------------------------------
class ConfigError(TrainingError, ValueError):
    """A setting that cannot work. The message is one line: ``key=value: what is allowed``."""


class Constraint:
    """Metadata in ``Annotated[type, ...]`` that :func:`validate` checks against a composed value.

    ``problem`` returns what is wrong with a value (``"must be >= 0"``) or None; None values (null: off) and
    values of another type (OmegaConf's business) pass. An ``environment`` constraint checks this machine
    rather than the value alone, and runs only when a config is validated for work here."""

    environment = False

    def problem(self, value: Any) -> Optional[str]:
        raise NotImplementedError


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class Range(Constraint):
    """Numeric bounds: ``Range(ge=0)``, ``Range(gt=0)``, ``Range(ge=0, le=1)``, ``Range(ge=0, lt=1)``."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def __post_init__(self):
        if (self.ge is not None and self.gt is not None) or (self.le is not None and self.lt is not None):
            raise ValueError("Range takes one lower bound (ge or gt) and one upper bound (le or lt)")
        if all(b is None for b in (self.ge, self.gt, self.le, self.lt)):
            raise ValueError("Range needs a bound")

    @property
    def text(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{_number(low[1])}, {_number(high[0])}{high[1]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}"
        return f"{'<=' if high[1] == ']' else '<'} {_number(high[0])}"

    def problem(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        ok = not math.isnan(value) and all(
            (
                self.ge is None or value >= self.ge,
                self.gt is None or value > self.gt,
                self.le is None or value <= self.le,
                self.lt is None or value < self.lt,
            )
        )
        return None if ok else f"must be {self.text}"


class Choice(Constraint):
    """One of a few words, compared case-insensitively (the command line turns `true` into a bool, which a str
    field stores as "True")."""

    def __init__(self, *values: str):
        self.values = values

    def __repr__(self) -> str:
        return f"Choice{self.values}"

    def problem(self, value):
        if value is None or str(value).lower() in {v.lower() for v in self.values}:
            return None
        return f"must be one of {', '.join(self.values)}"


class Pattern(Constraint):
    """A string matching a regular expression (whole string); ``text`` says in words what is allowed."""

    def __init__(self, regex: str, text: str):
        self.regex, self.text = re.compile(regex), text

    def __repr__(self) -> str:
        return f"Pattern({self.regex.pattern!r})"

    def problem(self, value):
        if value is None or self.regex.fullmatch(str(value)):
            return None
        return f"must be {self.text}"


class CudaAvailable(Constraint):
    """A `cuda` / `cuda:N` device must exist on this machine (an environment check)."""

    environment = True

    def problem(self, value):
        name = str(value)
        if not name.startswith("cuda"):
            return None
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (torch.cuda.is_available() is False); use auto or cpu"
        index = name.partition(":")[2]
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            return f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
        return None


class Flag:
    """A marker in ``Annotated[...]`` that is no check (see MAY_CHANGE_ON_RESUME). On a nested schema it covers
    every key below it."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


# A setting that says how a run runs, not what it computes: it may differ between a run and its resume
# (onthefly.engine.checkpoint refuses a resume whose other settings differ).
MAY_CHANGE_ON_RESUME = Flag("MAY_CHANGE_ON_RESUME")

PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Probability = Annotated[float, Range(ge=0, le=1)]
DropoutRate = Annotated[float, Range(ge=0, lt=1)]  # nn.Dropout's p; 1 would leave nothing to learn from


# --- enums ---------------------------------------------------------------------------------------------------
class Split(str, enum.Enum):
    val = "val"
    test = "test"


class Estimator(str, enum.Enum):
    """How uni-modal logits are read off a fusion head (docs/method.md §1)."""

    natural = "natural"  # the head's own estimator: W-slice + b/M (concat), per-branch (sum, FiLM, gated)
    zero_out = "zero_out"  # the head applied with every other modality's feature set to zero


class RhoReduce(str, enum.Enum):
    """How ρ_m is formed for M > 2 modalities (docs/method.md §2); all coincide for M = 2."""

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


# --- the top-level config --------------------------------------------------------------------------------------
# Each field's comment is in its YAML file (conf/trainer/default.yaml, ...), which lists every key.
_Resumable = MAY_CHANGE_ON_RESUME


class MetricWhen(str, enum.Enum):
    """When an imbalance metric is computed (docs/method.md §15)."""

    off = "off"
    test = "test"  # on the test split, at the end (the selected checkpoint)
    every_epoch = "every_epoch"  # also on val after every epoch (a curve in metrics.csv / W&B)


class SampleValue(str, enum.Enum):
    scaled = "scaled"  # v_i(S) = |S| * 1[correct] (the valuation method's per-sample value)
    correct = "correct"  # v_i(S) = 1[correct]


@dataclass
class ImbalanceConfig:
    """Imbalance and cost metrics of every run (onthefly.engine.imbalance, docs/method.md §15). They measure, they
    do not train: they may change on a resume."""

    shapley: MetricWhen = MetricWhen.every_epoch
    sample_value: SampleValue = SampleValue.scaled
    utilization: MetricWhen = MetricWhen.test
    cost: bool = True


@dataclass
class TrainerConfig:
    epochs: Annotated[int, Range(ge=1), _Resumable] = 10
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 256
    num_workers: Annotated[int, Range(ge=0), _Resumable] = 0
    device: Annotated[
        str, Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"), CudaAvailable(), _Resumable
    ] = "auto"
    threads: Annotated[Optional[int], Range(ge=1), _Resumable] = None
    # NHWC conv layout: auto = on for CUDA (tensor cores), off on CPU, where oneDNN's AVX-512 NHWC weight-gradient
    # kernel crashes on some conv shapes (README, troubleshooting); true forces it on any device, with a warning on CPU
    channels_last: Annotated[str, Choice("auto", "true", "false")] = "auto"
    modalities: Optional[List[str]] = None
    limit_train_batches: Optional[PositiveInt] = None
    limit_eval_batches: Optional[PositiveInt] = None
    log_every_n_steps: PositiveInt = 1
    select_on: Split = Split.val
    eval_test: Annotated[bool, _Resumable] = True
    save_checkpoint: Annotated[bool, _Resumable] = True
    plots: Annotated[bool, _Resumable] = True
    progress: Annotated[bool, _Resumable] = True
    deterministic: bool = True
    grad_clip: Optional[PositiveFloat] = None
    max_nonfinite_steps: NonNegativeInt = 10
    # --- speed (GPU path; the defaults change nothing on a CPU) ---
    precision: Precision = Precision["32"]
    compile: Annotated[bool, _Resumable] = False
    compile_backend: Annotated[str, _Resumable] = "inductor"
    pin_memory: Annotated[bool, _Resumable] = True
    prefetch_factor: Annotated[Optional[int], Range(ge=1), _Resumable] = None
    # --- data parallel (torchrun / Slurm tasks; ignored in a single process) ---
    sync_batchnorm: bool = True
    find_unused_parameters: bool = False
    # --- checkpoints and resume ---
    resume: Annotated[str, _Resumable] = "never"  # never | auto | path of a checkpoint file
    checkpoint_every_n_steps: Annotated[Optional[int], Range(ge=1), _Resumable] = 500
    keep_checkpoints: Annotated[int, Range(ge=0), _Resumable] = 1
    # --- what is measured besides the task's metrics ---
    imbalance: Annotated[ImbalanceConfig, _Resumable] = field(default_factory=ImbalanceConfig)


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
    log_steps: bool = True


@dataclass
class PathsConfig:
    data_root: str = "${oc.env:ONTHEFLY_DATA,data}"
    output_root: str = "outputs"


@dataclass
class BackboneConfig:
    """A backbone is one encoder config (with `_target_`) per modality name (plus, under ``context``, one per
    context input); a model builds the ones it needs."""

    name: str = MISSING
    width: PositiveInt = 64
    encoders: Dict[str, Any] = field(default_factory=dict)
    # encoders of context inputs (AVQA's question): encoded and given to the head, never balanced
    context: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    dataset: Any = MISSING
    task: Any = MISSING
    backbone: BackboneConfig = MISSING
    fusion: Any = MISSING
    modulation: Any = MISSING
    optim: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Annotated[LoggerConfig, _Resumable] = field(default_factory=LoggerConfig)
    paths: Annotated[PathsConfig, _Resumable] = field(default_factory=PathsConfig)
    discrepancy: DiscrepancyConfig = field(default_factory=DiscrepancyConfig)
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 0  # numpy's seed range
    name: Annotated[Optional[str], _Resumable] = None  # deprecated alias of logger.name (warns); goes in a release
    # which protocol's choices the run makes (the fidelity group records its name here; conf/fidelity/) and which
    # authors' release a preset follows (conf/release/)
    fidelity: Annotated[str, Choice("clean", "official")] = "clean"
    release: Annotated[str, Choice("none", "cvpr2022", "tpami2024")] = "none"


# --- optimizer / scheduler schemas (torch classes, so written out here) -------------------------------------
Beta = Annotated[float, Range(ge=0, lt=1)]


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: PositiveFloat = 1e-3
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    weight_decay: NonNegativeFloat = 1e-4
    nesterov: bool = False
    foreach: Optional[bool] = True


@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.01
    betas: List[Beta] = field(default_factory=lambda: [0.9, 0.999])
    eps: PositiveFloat = 1e-8
    foreach: Optional[bool] = True


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    betas: List[Beta] = field(default_factory=lambda: [0.9, 0.999])
    eps: PositiveFloat = 1e-8
    foreach: Optional[bool] = True


@dataclass
class StepLRConfig:
    _target_: str = "torch.optim.lr_scheduler.StepLR"
    _partial_: bool = True
    step_size: PositiveInt = 70
    gamma: PositiveFloat = 0.1


@dataclass
class ConstantLRConfig:
    _target_: str = "torch.optim.lr_scheduler.ConstantLR"
    _partial_: bool = True
    factor: Probability = 1.0
    total_iters: NonNegativeInt = 0


# schema of every node that names a `_target_` (filled by register_configs and @configurable)
_SCHEMAS: Dict[str, type] = {}
_WRITTEN_OUT = {
    "backbone_schema": BackboneConfig,
    "SGD_schema": SGDConfig,
    "AdamW_schema": AdamWConfig,
    "Adam_schema": AdamConfig,
    "StepLR_schema": StepLRConfig,
    "ConstantLR_schema": ConstantLRConfig,
}


def _store_schema(name: str, schema: type) -> None:
    """Store ``schema`` at the root of the ConfigStore (YAML files say ``- /<name>@_here_``), and remember it by
    its ``_target_``."""
    target = getattr(schema, "_target_", None)
    known = _SCHEMAS.get(target) if isinstance(target, str) else None
    if known is not None and known.__qualname__ != schema.__qualname__:
        raise ValueError(f"two schemas for {target}: {known} and {schema}")
    if isinstance(target, str):
        _SCHEMAS[target] = schema
    ConfigStore.instance().store(name=name, node=schema)


# --- schemas derived from class signatures ---------------------------------------------------------------
def _field_for(name: str, annotation: Any, default: Any):
    if default is inspect.Parameter.empty:
        return (name, annotation, field(default=MISSING))
    if isinstance(default, (list, dict)):
        return (name, annotation, field(default_factory=lambda d=default: type(d)(d)))
    if dataclasses.is_dataclass(default):  # an options object shared by several classes
        return (name, annotation, field(default_factory=lambda d=default: dataclasses.replace(d)))
    return (name, annotation, field(default=default))


def _schema_type(annotation: Any) -> Any:
    """Map an __init__ annotation to a type OmegaConf understands (a configurable class -> its schema), keeping
    ``Annotated`` metadata (ranges, flags) for :func:`validate`."""
    if typing.get_origin(annotation) is Annotated:
        inner, *metadata = typing.get_args(annotation)
        return Annotated[(_schema_type(inner), *metadata)]
    if isinstance(annotation, type) and hasattr(annotation, "Config") and dataclasses.is_dataclass(annotation.Config):
        return annotation.Config
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):  # a nested options dataclass
        return annotation
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
    """Class decorator: derive a dataclass schema from ``__init__`` and store it as ``<Class>_schema``.

    ``group`` is the option group the class's YAML files live in. ``runtime`` names arguments supplied by the
    code when the object is built (feature sizes, class counts), which are therefore not part of the config.
    Annotate a parameter ``Annotated[float, Range(ge=0)]`` (or ``Probability``, ``PositiveInt``, ...) and
    :func:`validate` checks it.
    """

    def decorate(cls):
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
        fields = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
        for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if name in runtime or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            fields.append(_field_for(name, _schema_type(hints.get(name, Any)), param.default))
        schema = dataclasses.make_dataclass(f"{cls.__name__}Config", fields)
        schema.__module__ = cls.__module__
        cls.Config = schema
        _store_schema(f"{cls.__name__}_schema", schema)
        return cls

    return decorate


_registered = False


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent). Call before composing."""
    global _registered
    if _registered:
        return
    ConfigStore.instance().store(name="config_schema", node=Config)
    for name, schema in _WRITTEN_OUT.items():
        _store_schema(name, schema)
    for module in _SCHEMA_MODULES:
        importlib.import_module(module)
    _registered = True


# --- walking a composed config with its schemas ----------------------------------------------------------------
@functools.cache
def _field_hints(schema: type) -> Dict[str, Any]:
    return typing.get_type_hints(schema, include_extras=True)


def _unwrap(hint: Any) -> tuple[Any, tuple]:
    """(the bare type, the Annotated metadata) of a type hint, looking through Optional[...]."""
    metadata: tuple = ()
    while True:
        if typing.get_origin(hint) is Annotated:
            hint, *more = typing.get_args(hint)
            metadata += tuple(more)
        elif typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                return Any, metadata
            hint = args[0]
        else:
            return hint, metadata


def _schema_of(node: dict, hint: Any) -> Optional[type]:
    """A dict node's schema: the class its ``_target_`` names (configurable or written out), else its declared
    type. Works on containers read back from a run folder too (no OmegaConf type information needed)."""
    target = node.get("_target_")
    if isinstance(target, str) and target in _SCHEMAS:
        return _SCHEMAS[target]
    return hint if dataclasses.is_dataclass(hint) else None


def walk(config: dict, visit: Callable[[str, Any, tuple], None], schema: type = None) -> None:
    """Call ``visit(key, value, metadata)`` for every node of ``config`` (a plain container: dicts, lists and
    values), where ``key`` is the dotted key (``modulation.ogm.alpha``, ``optim.betas[0]``) and ``metadata`` the
    Annotated metadata its schema field carries, plus any Flag of the nodes above it."""
    register_configs()

    def go(value: Any, hint: Any, key: str, inherited: tuple) -> None:
        hint, metadata = _unwrap(hint)
        metadata = inherited + metadata
        visit(key, value, metadata)
        flags = tuple(m for m in metadata if isinstance(m, Flag))
        prefix = f"{key}." if key else ""
        if isinstance(value, dict):
            node_schema = _schema_of(value, hint)
            if node_schema is not None:
                hints = _field_hints(node_schema)
                child_hint = lambda k: hints.get(k, Any)  # noqa: E731
            else:
                args = typing.get_args(hint) if typing.get_origin(hint) in (dict, Dict) else ()
                child_hint = lambda k: args[1] if args else Any  # noqa: E731
            for k, v in value.items():
                go(v, child_hint(k), f"{prefix}{k}", flags)
        elif isinstance(value, list):
            args = typing.get_args(hint) if typing.get_origin(hint) in (list, List) else ()
            for i, v in enumerate(value):
                go(v, args[0] if args else Any, f"{key}[{i}]", flags)

    go(config, schema or Config, "", ())


def _containers(cfg: DictConfig | dict) -> tuple[dict, dict]:
    """The config as plain containers (Hydra's own node left out): with interpolations resolved where they
    resolve, and as written."""
    if isinstance(cfg, dict):
        return cfg, cfg
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    written = OmegaConf.to_container(cfg, resolve=False)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False), written
    except OmegaConfBaseException:  # an interpolation that does not resolve here: check the values as written
        return written, written


_REFERENCE = re.compile(r"\$\{[\w.]+\}")


def _shown(value: Any) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def problems(cfg: DictConfig | dict, environment: bool = False) -> list[str]:
    """Every value of ``cfg`` that its schema's constraints refuse, as ``key=value: must be ...``."""
    found: dict[str, str] = {}

    def visit(key: str, value: Any, metadata: tuple) -> None:
        if value is None or isinstance(value, (dict, list)):
            return
        for constraint in metadata:
            if isinstance(constraint, Constraint) and (environment or not constraint.environment):
                problem = constraint.problem(value)
                if problem:
                    found.setdefault(key, f"{key}={_shown(value)}: {problem}")

    resolved, written = _containers(cfg)
    walk(resolved, visit)
    # a key written as a reference to another (`width: ${backbone.width}`) is not reported when that one is
    references: dict[str, str] = {}
    walk(
        written,
        lambda key, value, _: (
            references.update({key: value[2:-1]}) if isinstance(value, str) and _REFERENCE.fullmatch(value) else None
        ),
    )
    return [text for key, text in found.items() if references.get(key) not in found]


def validate(cfg: DictConfig | dict, environment: bool = True) -> None:
    """Raise :class:`ConfigError` (one line) if any value of ``cfg`` is outside what its schema allows.

    ``environment`` also checks what depends on this machine (``trainer.device=cuda`` needs CUDA): leave it on
    when the config is about to run here, turn it off to check a config meant for another machine."""
    found = problems(cfg, environment)
    if found:
        raise ConfigError("; ".join(found))


def may_change_on_resume(*configs: dict) -> set[str]:
    """Dotted keys of these configs (plain containers) that carry MAY_CHANGE_ON_RESUME, or sit below one."""
    keys: set[str] = set()

    def visit(key: str, value: Any, metadata: tuple) -> None:
        if any(m is MAY_CHANGE_ON_RESUME for m in metadata):
            keys.add(key)

    for config in configs:
        walk(config, visit)
    return keys


def registered_targets() -> set[str]:
    """Every ``_target_`` the project registers a schema for (its configurable classes, the optimizer and
    scheduler schemas): what a config read from a user's file may name."""
    register_configs()
    return set(_SCHEMAS)


def compose(overrides: list[str] | None = None, config_name: str = "config", environment: bool = True):
    """Compose the project config outside a Hydra app (tests, the demo, bench, notebooks) and :func:`validate`
    it (``environment=False``: a config meant for another machine, device availability is not checked)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    validate(cfg, environment=environment)
    return cfg
