"""The one factory from config: seed, then the splits, the model, the method, the optimizer and the scheduler.

Training (`onthefly.engine.run`), the analyses (`onthefly.engine.analysis`), `make bench` and the demo all build
through :func:`build`, so a run is made the same way wherever it is made (and on every rank of a DDP run).
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from onthefly.engine.distributed import DistInfo
from onthefly.engine.errors import TrainingError
from onthefly.models import model_for
from onthefly.modulation.base import Modulation, default_param_groups
from onthefly.tasks import Task, build_task

CPU_NHWC_WARNING = (
    "trainer.channels_last=true on a CPU: oneDNN's AVX-512 NHWC convolution backward crashes (segmentation fault) on "
    "some conv shapes with torch 2.14 (e.g. a 1x1 stride-2 conv over 8 channels at 256x16). If this run dies in "
    "loss.backward(), use trainer.channels_last=auto (off on CPU) or set ONEDNN_MAX_CPU_ISA=AVX2."
)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def use_channels_last(setting, device: torch.device) -> bool:
    """``trainer.channels_last`` resolved for ``device``: auto = on for CUDA only; true forces it (warning on CPU)."""
    value = str(setting).lower()
    if value not in ("auto", "true", "false"):
        raise TrainingError(f"trainer.channels_last={setting!r}: expected auto, true or false")
    if value == "auto":
        return device.type == "cuda"
    if value == "true" and device.type == "cpu":
        warnings.warn(CPU_NHWC_WARNING, stacklevel=2)
    return value == "true"


# oneDNN's AMX kernels for bfloat16 convolution (CPUs with amx_bf16: Intel Xeon Sapphire Rapids and later) return
# garbage (values near 1e37, or NaN) for some small outputs at batch 64, e.g. a 3x3 stride-2 conv of a 64x32x5x2 input:
# the width-8 ResNet18's last stage on synth_av (torch 2.11 and 2.14). The AVX512_CORE_BF16 kernels compute it right.
BF16_SAFE_ISA = "AVX512_CORE_BF16"
CPU_BF16_ERROR = (
    "trainer.precision=bf16 on this CPU: oneDNN's bfloat16 convolution returns wrong values here (its AMX kernels, on "
    "some small conv shapes). Start the command with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 in the environment (oneDNN "
    "reads it before its first convolution), or use trainer.precision=32; the README's troubleshooting says more."
)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_conv_is_right() -> bool:
    """Whether a bfloat16 convolution of the shape oneDNN's AMX kernels get wrong matches float32 on this CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, 5, 2, generator=g).bfloat16()
    w = (torch.randn(64, 32, 3, 3, generator=g) * 0.05).bfloat16()
    y = nn.functional.conv2d(x, w, stride=2, padding=1).float()
    ref = nn.functional.conv2d(x.float(), w.float(), stride=2, padding=1)
    return bool(torch.isfinite(y).all()) and float((y - ref).abs().max()) < 0.1


def limit_onednn_for_bf16() -> bool:
    """On a CPU with AMX, limit oneDNN to its AVX512_CORE_BF16 kernels, unless ONEDNN_MAX_CPU_ISA is already chosen;
    True when this set the limit. Effective only before oneDNN's first convolution in the process."""
    if "ONEDNN_MAX_CPU_ISA" in os.environ or "amx_bf16" not in _cpu_flags():
        return False
    os.environ["ONEDNN_MAX_CPU_ISA"] = BF16_SAFE_ISA
    return True


def check_cpu_bf16(precision, device: torch.device) -> None:
    """Before a bf16 run on a CPU: on a CPU with AMX, limit oneDNN to its AVX512_CORE_BF16 kernels (unless the user
    chose ONEDNN_MAX_CPU_ISA), then check that a bf16 convolution is right, and stop with the fix if it is not (oneDNN
    fixes its kernel set at its first convolution, so the limit comes too late in a process that already ran one)."""
    if device.type != "cpu" or str(getattr(precision, "value", precision)) != "bf16":
        return
    if limit_onednn_for_bf16():
        warnings.warn(
            f"trainer.precision=bf16 on a CPU with AMX: oneDNN is limited to its {BF16_SAFE_ISA} kernels for this run, "
            "since its AMX bfloat16 convolution returns wrong values on some shapes (README, troubleshooting).",
            stacklevel=2,
        )
    if not bf16_conv_is_right():
        raise TrainingError(CPU_BF16_ERROR)


@dataclass
class Parts:
    """What a run trains: built (and seeded) the same way on every rank."""

    model: nn.Module
    modulation: Modulation
    splits: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    modalities: list
    task: Task


def check_targets(cfg, source: str) -> None:
    """Refuse a config (read from a file a user handed us) that would build anything but the project's own
    registered classes: ``_target_`` is how Hydra picks what to call, so a planted one could run any code."""
    from onthefly.config import registered_targets

    allowed = registered_targets()

    def walk(node, path: str):
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}" if path else str(key)
                if key == "_target_" and value not in allowed:
                    raise TrainingError(
                        f"{source}: {here}={value!r} is not one of onthefly's registered classes, so it is not "
                        "built (a run folder's config may only name the project's own datasets, encoders, fusions, "
                        "methods and tasks); restore the file from the run's original, or retrain"
                    )
                walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else cfg, "")


def build_splits(cfg: DictConfig):
    """The dataset's train / val / test splits (``cfg.dataset`` instantiated)."""
    return instantiate(cfg.dataset).splits()


def build_model(cfg: DictConfig, splits, device: torch.device, info: Optional[DistInfo] = None):
    """(model on ``device`` in its memory format, compiled if asked; its modalities; the task)."""
    tc, info = cfg.trainer, info or DistInfo()
    modalities = list(tc.modalities) if tc.modalities else list(splits.modalities)
    unknown = [m for m in modalities if m not in splits.modalities]
    if unknown:
        raise TrainingError(f"trainer.modalities names {unknown}, but the dataset has {splits.modalities}")
    task = build_task(cfg, splits)
    model = model_for(cfg, modalities, splits, task)
    if info.enabled and tc.sync_batchnorm:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif info.is_main:
            warnings.warn(
                "SyncBatchNorm needs a GPU: on this CPU (gloo) run BatchNorm statistics are per rank.", stacklevel=2
            )
    model = model.to(device)
    if use_channels_last(tc.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    if tc.compile:
        for encoder in model.encoders.values():
            # in place, so parameter names stay as they are. dynamic=False: one static graph per input shape (the
            # train batch, a last partial batch, the eval batch), since inductor's dynamic-shape path fails on these
            # encoders ("cannot determine truth value of Relational", torch 2.11 and 2.14)
            encoder.compile(backend=tc.compile_backend, dynamic=False)
    return model, modalities, task


def build(cfg: DictConfig, device: torch.device, info: Optional[DistInfo] = None) -> Parts:
    """Seed, then build the dataset splits, the model (on ``device``, in its memory format, compiled if asked),
    the method, the optimizer and the scheduler from ``cfg``."""
    tc = cfg.trainer
    if tc.threads:
        torch.set_num_threads(tc.threads)
    check_cpu_bf16(tc.precision, device)
    seed_everything(cfg.seed, tc.deterministic)
    splits = build_splits(cfg)
    model, modalities, task = build_model(cfg, splits, device, info)
    modulation: Modulation = instantiate(cfg.modulation)
    if modulation.needs_rho and len(modalities) < 2:
        raise TrainingError(
            f"modulation {type(modulation).__name__} balances modalities, but this model has only {modalities}; "
            "use modulation=none for uni-modal runs."
        )
    modulation.setup(model, splits.num_classes)
    extra = modulation.extra_module()
    if extra is not None:
        extra.to(device)
    optimizer, scheduler = make_optimizer(cfg, model, modulation, extra, epoch=0)
    return Parts(model, modulation, splits, optimizer, scheduler, modalities, task)


def make_optimizer(
    cfg: DictConfig, model: nn.Module, modulation: Modulation, extra: Optional[nn.Module], epoch: int = 0
):
    """(optimizer, scheduler) from cfg.optim / cfg.scheduler over the method's parameter groups for ``epoch``
    (a group's own options, e.g. its lr, override cfg.optim's)."""
    groups = modulation.param_groups(model, extra, epoch) or default_param_groups([model, extra])
    optimizer = instantiate(cfg.optim)(groups)
    return optimizer, instantiate(cfg.scheduler)(optimizer)
