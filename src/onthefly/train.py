"""`python -m onthefly.train [group=option ...] [key=value ...]` (add `-m` for a multirun sweep).

Also the entry point of every rank under torchrun (`torchrun --nproc_per_node=N -m onthefly.train ...`) and of
every job of the launcher presets (`-m hydra/launcher=serial|parallel|local|slurm`, conf/hydra/launcher/).

A job that fails is that job's failure: its folder keeps what it computed and a results.json with status failed
and the error, the other jobs of a sweep run, and the command exits non-zero. The task function returns the
selected checkpoint's score on its selection split (val accuracy by default): what a hyperparameter search
(`hparams_search=…`) maximises.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from onthefly.config import CONF_DIR, register_configs, validate
from onthefly.engine.errors import TrainingError

register_configs()
log = logging.getLogger("onthefly")


class JobFailed(CompactHydraException):
    """A job that stopped on a :class:`TrainingError`. Raised (never ``sys.exit``) so that a sweep's other jobs
    still run; Hydra prints its message as one line and the command exits 1."""


def record_failure(out_dir: Path, cfg: DictConfig, err: BaseException, since: float) -> None:
    """Write results.json (status failed, the error) for a job that stopped before its run folder recorded
    anything (e.g. while building: an unknown modality). A record the run itself wrote during this attempt is
    kept; one left from an earlier attempt is replaced, so the folder never reports a stale status."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = Path(out_dir) / "results.json"
    if path.exists() and path.stat().st_mtime >= since:
        return
    try:
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:  # noqa: BLE001  (a config that cannot resolve is itself the error; keep it unresolved)
        config = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"status": "failed", "error": f"{type(err).__name__}: {err}", "config": config, "epochs_done": 0},
            indent=2,
            default=str,
        )
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from onthefly.data.base import DataError
    from onthefly.engine.identity import identify
    from onthefly.engine.run import run

    out_dir = HydraConfig.get().runtime.output_dir
    started = time.time() - 1.0  # file times may be coarser than time.time()
    try:
        validate(cfg)  # a value out of range (or trainer.device=cuda without CUDA): one line, before any work
        results = run(cfg, out_dir, identify(cfg, HydraConfig.get()))  # name, group, job type: engine/identity.py
    except (TrainingError, DataError) as err:  # a setting or the data: one line says what to do
        record_failure(Path(out_dir), cfg, err, started)
        log.error("%s", err)
        raise JobFailed(str(err)) from None
    except Exception as err:
        record_failure(Path(out_dir), cfg, err, started)
        log.exception("the run stopped on an unexpected error (results.json in %s records it)", out_dir)
        raise
    test = results.get("test", {})
    best = results.get("best") or {}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary line, from rank 0
        shown = [k for k in ("acc", "map", "f1", "mae", "corr", "acc7") if k in test]
        selected = f"{best.get('split', 'val')}/acc {best['score']:.4f} (epoch {best['epoch']})  " if best else ""
        log.info("%s%s  -> %s", selected, "  ".join(f"test/{k} {test[k]:.4f}" for k in shown), out_dir)
    return float(best["score"]) if best else float("nan")


if __name__ == "__main__":
    main()
