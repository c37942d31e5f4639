"""Who a run is: its name, group, job type and tags (W&B's run identity) and the Hydra choices it was made of.

Decided here and nowhere else. With ``logger.name`` / ``logger.group`` / ``logger.job_type`` set, those win;
otherwise, from the Hydra job:

* name: ``<dataset>-<fusion>-<modulation>-s<seed>`` (the group choices); in a sweep (``-m``) followed by every
  other swept key of this job (``... optim.lr=0.01 modulation.alpha=0.3``), the overrides that set it apart from
  the sweep's other runs (the full settings are in the run's config);
* group: in a sweep, the sweep (its folder, e.g. ``multirun/2025-01-31/12-00-00``; a table sweep passes its table
  name); a single run has none;
* job_type: the method's config choice (``ogm_ge``, not the class name);
* tags: ``logger.tags``;
* choices: every Hydra group choice (dataset, fusion, modulation, backbone, ...), logged into the W&B config under
  ``choices`` so that W&B can filter and group by them.

Outside a Hydra app (``onthefly.config.compose`` in tests, notebooks, the demo) the choices are unknown, and the
name and job type fall back to the class names of the dataset, fusion head and method.

The run name's one key is ``logger.name``; the top-level ``name`` is a deprecated alias of it (warning).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from onthefly.engine.errors import TrainingError

BASE = ("dataset", "fusion", "modulation")  # the group choices every name starts with (then s<seed>)
NOT_IN_NAME = ("logger.", "paths.", "hydra.", "hydra/")  # swept or not, never part of a name
NAME_MAX = 128  # W&B's limit for display names and groups


@dataclass
class RunIdentity:
    name: Optional[str]
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: list = field(default_factory=list)
    choices: dict = field(default_factory=dict)

    def wandb_options(self, logger_cfg) -> dict:
        """``wandb.init`` keyword arguments (mode, project, entity and this identity)."""
        return {
            "mode": str(getattr(logger_cfg.mode, "value", logger_cfg.mode)),
            "project": logger_cfg.project,
            "entity": logger_cfg.entity,
            "group": self.group,
            "job_type": self.job_type,
            "name": self.name,
            "tags": list(self.tags),
        }

    def apply(self, cfg: DictConfig) -> None:
        """Write the decided name, group and job type into ``cfg.logger`` (so config.yaml records them)."""
        cfg.logger.name, cfg.logger.group, cfg.logger.job_type = self.name, self.group, self.job_type


def _class(node) -> str:
    target = node.get("_target_") if node is not None else None
    return str(target).rsplit(".", 1)[-1] if target else "?"


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _swept_keys(hydra) -> Optional[set[str]]:
    """Keys the sweep varies: the sweep's command-line overrides with sweep syntax (``a,b``, ``range()``, ...),
    read from the multirun.yaml Hydra wrote into the sweep folder, plus the sweeper's own ``params``. None when
    that cannot be known (a sweeper that writes no multirun.yaml): the name then holds every override."""
    try:
        params = hydra.sweeper.get("params")
        keys = {str(k) for k in params.keys()} if params else set()
        sweep_dir = _sweep_dir(hydra)
        path = sweep_dir / "multirun.yaml" if sweep_dir is not None else None
        if path is None or not path.is_file():
            return keys or None
        task = OmegaConf.load(path).hydra.overrides.task
        return keys | {o.key_or_group for o in _parse(list(task)) if o.is_sweep_override()}
    except Exception:  # noqa: BLE001  (a sweeper's files we cannot read: the name then holds every override)
        return None


def _sweep_dir(hydra) -> Optional[Path]:
    """The sweep's folder: the job's output folder without its ``hydra.sweep.subdir`` (the sweep.dir setting itself
    may name the time of the job instead of the sweep's when it is re-resolved in a job process)."""
    out = hydra.runtime.get("output_dir")
    subdir = str(hydra.sweep.get("subdir") or "")
    if out:
        out = str(out)
        if subdir and out.endswith("/" + subdir):
            return Path(out[: -len(subdir) - 1])
        return Path(out).parent
    return Path(str(hydra.sweep.dir)) if hydra.sweep.get("dir") else None


def _group_of(sweep_dir: Path, cfg: DictConfig) -> str:
    """A sweep's folder as a group name: relative to paths.output_root or the working directory when inside."""
    sweep_dir = sweep_dir.resolve()
    for root in (cfg.paths.get("output_root"), "."):
        try:
            return str(sweep_dir.relative_to(Path(str(root)).resolve()))[-NAME_MAX:]
        except (ValueError, TypeError):
            continue
    return str(sweep_dir)[-NAME_MAX:]


def _check_mode(lc) -> None:
    """logger.mode defaults to $WANDB_MODE: a value W&B knows but this schema does not (dryrun, run) is refused
    here, in one line naming both keys, rather than in a traceback on first use."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        lc.mode  # noqa: B018  (resolves the interpolation, validates the value)
    except OmegaConfBaseException as err:
        raise TrainingError(
            f"logger.mode: the environment's WANDB_MODE={os.environ.get('WANDB_MODE')!r} is not one of "
            "offline, online, disabled; change or unset WANDB_MODE, or set logger.mode=... on the "
            f"command line ({str(err).splitlines()[0]})"
        ) from err


def _hydra_mode(hydra) -> str:
    mode = hydra.get("mode")
    return str(getattr(mode, "name", mode) or "RUN")


def identify(cfg: DictConfig, hydra: Any = None) -> RunIdentity:
    """The identity of the run ``cfg`` describes. ``hydra``: the job's Hydra config (``HydraConfig.get()``);
    None outside a Hydra app (the current Hydra job's is used when there is one)."""
    if hydra is None:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get() if HydraConfig.initialized() else None
    lc = cfg.logger
    _check_mode(lc)
    legacy = cfg.get("name")
    if legacy is not None:
        if lc.name is not None and lc.name != legacy:
            raise TrainingError(
                f"name={legacy!r} and logger.name={lc.name!r} disagree: set the run name with "
                "logger.name only (the top-level name is a deprecated alias of it)"
            )
        warnings.warn(
            f"name={legacy!r}: the top-level `name` is deprecated; set the run name with logger.name={legacy!r}.",
            FutureWarning,
            stacklevel=2,
        )

    choices = {}
    if hydra is not None:
        choices = {
            str(k): str(v)
            for k, v in (hydra.runtime.get("choices") or {}).items()
            if v is not None and not str(k).startswith("hydra/")
        }
    parts = [choices.get(g) or _class(cfg.get(g)) for g in BASE]
    name = "-".join(parts) + f"-s{cfg.seed}"
    group = None
    if hydra is not None and _hydra_mode(hydra) == "MULTIRUN":
        swept = _swept_keys(hydra)
        extras = [
            o.input_line
            for o in _parse(list(hydra.overrides.get("task") or []))
            if o.key_or_group not in (*BASE, "seed", "name")
            and not o.key_or_group.startswith(NOT_IN_NAME)
            and (swept is None or o.key_or_group in swept)
        ]
        if extras:
            name = f"{name} {' '.join(extras)}"
        sweep_dir = _sweep_dir(hydra)
        group = _group_of(sweep_dir, cfg) if sweep_dir is not None else None
    return RunIdentity(
        name=(lc.name or legacy or name)[:NAME_MAX],
        group=lc.group or group,
        job_type=lc.job_type or choices.get("modulation") or _class(cfg.get("modulation")),
        tags=list(lc.tags),
        choices=choices,
    )
