"""`python -m onthefly.train [group=option ...] [key=value ...]` (add `-m` for a multirun sweep).

Also the entry point of every rank under torchrun (`torchrun --nproc_per_node=N -m onthefly.train ...`) and of
every job of the submitit (Slurm) and joblib launchers (`-m hydra/launcher=slurm|local|parallel`)."""
from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from onthefly.config import CONF_DIR, register_configs, validate

register_configs()
log = logging.getLogger("onthefly")


def default_name(cfg: DictConfig) -> str:
    choices = HydraConfig.get().runtime.choices
    return f"{choices.get('dataset')}-{choices.get('fusion')}-{choices.get('modulation')}-s{cfg.seed}"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from onthefly.engine.errors import TrainingError
    from onthefly.engine.run import run

    if cfg.name is None:
        with open_dict(cfg):
            cfg.name = default_name(cfg)
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        validate(cfg)  # a value out of range (or trainer.device=cuda without CUDA): one line, before any work
        results = run(cfg, out_dir)
    except TrainingError as err:
        log.error("%s", err)
        sys.exit(1)
    test = results.get("test", {})
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary line, from rank 0
        shown = [k for k in ("acc", "map", "f1", "mae", "corr", "acc7") if k in test]
        log.info("%s  -> %s", "  ".join(f"test/{k} {test[k]:.4f}" for k in shown), out_dir)
    return float(test.get("acc", results["best"]["score"]))


if __name__ == "__main__":
    main()
