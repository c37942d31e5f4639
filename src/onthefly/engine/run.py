"""One run: its folder, its resume point, its logger and its results, around the trainer.

`train(cfg, out_dir)` is what `python -m onthefly.train` calls (on every rank under torchrun): it builds the run
(`onthefly.engine.build`), finds the checkpoint to go on from, opens the run's logger (W&B + CSV/JSON), fits
(`onthefly.engine.trainer`) and writes results.json, best.pt and the plots. Whatever happens, results.json says
how the run ended and nothing already written is lost.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from onthefly.config import validate
from onthefly.engine import checkpoint as ckpt
from onthefly.engine import distributed as ddp
from onthefly.engine.build import build
from onthefly.engine.distributed import DistInfo
from onthefly.engine.errors import CheckpointError
from onthefly.engine.identity import NAME_MAX, RunIdentity, identify
from onthefly.engine.trainer import Trainer, config_dict
from onthefly.logging import RunLogger
from onthefly.modulation.base import NoModulation

log = logging.getLogger("onthefly")


def _resume_state(out_dir: Path, config: dict, tc, info: DistInfo) -> tuple[Optional[dict], Optional[Path]]:
    """The checkpoint this run continues from (rank 0 chooses the file, every rank reads it), checked against
    this run's settings, and its file; (None, None) for a fresh start."""
    chosen = None
    if info.is_main:
        found = ckpt.find_resume(out_dir, tc.resume)
        chosen = str(found[0]) if found else None
    chosen = ddp.broadcast_object(chosen, info)
    if chosen is None:
        return None, None
    state = ckpt.load(chosen)
    differ = ckpt.config_differences(state["config"], config)
    if differ:
        saved = ckpt._flatten(state["config"])
        now = ckpt._flatten(config)
        shown = ", ".join(f"{k}: {saved.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in differ[:6])
        raise CheckpointError(
            f"checkpoint {chosen} belongs to a run with other settings ({shown}); resume with the "
            "same settings, or start a new run folder (or trainer.resume=never)"
        )
    if state["world_size"] != info.world_size and state["step_in_epoch"]:
        raise CheckpointError(
            f"checkpoint {chosen} was written mid-epoch by {state['world_size']} ranks; resume it with "
            f"the same number of ranks (this run has {info.world_size}), or from an epoch-end checkpoint"
        )
    log.info(
        "resuming from %s (epoch %d, step %d of it, global step %d)",
        chosen,
        state["epoch"],
        state["step_in_epoch"],
        state["global_step"],
    )
    return state, Path(chosen)


def _finished(run_dir: Path) -> bool:
    try:
        done = json.loads((run_dir / "results.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False
    return done and (run_dir / "best.pt").exists()


def _prerequisites(
    cfg: DictConfig, parts, out_dir: Path, info: DistInfo, device: torch.device, identity: RunIdentity
) -> None:
    """Train the plain runs the method asks for first (each in ``<run>/prerequisites/<name>/``, named
    ``<run name>-<name>`` in the run's group; a finished one is reused, an interrupted one resumes) and hand their
    folders to the method. The RNG streams are put back as they were, so the main run goes on as if built
    alone."""
    wanted = parts.modulation.prerequisites()
    saved = ckpt.rng_state(device) if wanted else None
    folders = {}
    for name, changes in wanted.items():
        sub_dir = out_dir / "prerequisites" / name
        folders[name] = sub_dir
        if _finished(sub_dir):
            continue
        sub = cfg.copy()
        with open_dict(sub):
            sub.modulation = OmegaConf.structured(NoModulation.Config)
            sub.trainer.resume = "auto"
            sub.trainer.save_checkpoint = True  # the method reads its best.pt
            for key, value in changes.items():
                OmegaConf.update(sub, key, value, merge=False)
        sub_identity = RunIdentity(
            name=f"{identity.name or out_dir.name}-{name}"[:NAME_MAX],
            group=identity.group,
            job_type="prerequisite",
            tags=list(identity.tags),
            choices={**identity.choices, "modulation": "none"} if identity.choices else {},
        )
        log.info("training prerequisite run %r in %s", name, sub_dir)
        _train(sub, sub_dir, info, device, sub_identity)
    if saved is not None:
        ckpt.set_rng_state(saved, device)
    parts.modulation.use_prerequisites(folders)


def train(cfg: DictConfig, out_dir: Path | str, identity: Optional[RunIdentity] = None):
    """Train and evaluate one configuration; everything the run makes goes under ``out_dir``.

    Writes config.yaml, metrics.csv (per epoch), steps.csv (per step), results.json, best.pt, checkpoints/ and,
    unless logger.mode=disabled, a W&B run under out_dir/wandb (names: `onthefly.logging.names`). ``identity``:
    the run's W&B name, group, job type and Hydra choices (`onthefly.engine.identity`; the Hydra job's when
    None). Under torchrun every rank calls this; rank 0 alone writes. Returns (results, model at its best
    epoch, splits).
    """
    validate(cfg)  # every way into a run checks its settings first (compose() and the CLI do too)
    tc = cfg.trainer
    info, device = ddp.setup(tc.device)
    try:
        return _train(cfg, Path(ddp.broadcast_object(str(out_dir), info)), info, device, identity or identify(cfg))
    finally:
        ddp.teardown(info)


def _train(cfg: DictConfig, out_dir: Path, info: DistInfo, device: torch.device, identity: RunIdentity):
    tc = cfg.trainer
    identity.apply(cfg)  # config.yaml and results.json record the name, group and job type
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    parts = build(cfg, device, info)
    model, splits, modalities = parts.model, parts.splits, parts.modalities
    _prerequisites(cfg, parts, out_dir, info, device, identity)

    config = config_dict(cfg)
    resume_state, resume_path = _resume_state(out_dir, config, tc, info)
    lc = cfg.logger
    logged_config = {**config, "choices": identity.choices} if identity.choices else config
    logger = RunLogger(
        out_dir,
        logged_config,
        identity.wandb_options(lc),
        log_steps=lc.log_steps,
        enabled=info.is_main,
        resume=resume_state["logger"] if resume_state else None,
        resume_from=ckpt.run_dir_of(resume_path) if resume_path else None,
    )
    failed = True
    try:
        trainer = Trainer.from_parts(cfg, parts, logger, device, dist=info, out_dir=out_dir, resume_state=resume_state)
        results = trainer.fit()
        results.update(
            status="ok",
            modalities=modalities,
            num_classes=splits.num_classes,
            device=str(device),
            config=config,
            choices=identity.choices,
        )
        if info.enabled:
            results["world_size"] = info.world_size
        if tc.save_checkpoint and info.is_main:
            best_epoch = results["best"]["epoch"] if results["best"] else None
            ckpt.write_atomic({"model": model.state_dict(), "epoch": best_epoch}, out_dir / "best.pt")
            logger.log_model(
                out_dir / "best.pt",
                {"epoch": best_epoch, **{f"test/{k}": v for k, v in results.get("test", {}).items()}},
            )
        if tc.plots and info.is_main:
            from onthefly.plots import run_plots

            logger.log_images({f"plots/{path.stem}": path for path in run_plots(out_dir)})
        logger.finish(results)
        failed = False
        return results, model, splits
    except BaseException as err:  # record what happened, keep what was computed, re-raise
        logger.finish(
            {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}",
                "config": config,
                "epochs_done": len(logger.epoch_rows),
            }
        )
        raise
    finally:
        logger.close(failed=failed)


def run(cfg: DictConfig, out_dir: Path | str, identity: Optional[RunIdentity] = None) -> dict:
    """:func:`train`, returning only the results dict (what results.json holds)."""
    return train(cfg, out_dir, identity)[0]
