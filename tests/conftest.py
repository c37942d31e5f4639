"""Shared fixtures for the end-to-end tests: tiny run settings, W&B kept inside tmp folders, a run helper."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

# In-process bf16 runs (tests/test_precision.py) share this process's oneDNN, whose kernel set is fixed at its first
# convolution: on a CPU with AMX, cap it now at the kernels a bf16 CLI run gets (the same call as in
# onthefly.engine.build.check_cpu_bf16). AMX only serves bf16 / int8 work, so float32 tests run the same kernels either
# way; tests/test_cpu_kernels.py runs its subprocesses without the cap, on the native kernels.
from onthefly.engine.build import limit_onednn_for_bf16

limit_onednn_for_bf16()

# A few seconds per run on one CPU thread: 64/32/32 samples, 4 train steps per epoch, 2 epochs, no W&B
# (debug=fast sets logger.mode=disabled; add logger.mode=offline where a test needs W&B), no end-of-run plots.
TINY = [
    "debug=fast",
    "dataset.num_train=64",
    "dataset.num_val=32",
    "dataset.num_test=32",
    "trainer.batch_size=16",
    "trainer.eval_batch_size=32",
    "trainer.epochs=2",
    "trainer.limit_train_batches=null",
    "trainer.limit_eval_batches=null",
    "trainer.threads=1",
    "trainer.plots=false",  # matplotlib costs more than the run; the tests that check plots turn it back on
]
EPOCHS = 2
STEPS_PER_EPOCH = 64 // 16


@pytest.fixture
def tiny() -> list[str]:
    """The tiny overrides (a fresh list, so a test may extend it)."""
    return list(TINY)


@pytest.fixture(scope="session", autouse=True)
def wandb_sandbox(tmp_path_factory):
    """Keep W&B quiet, offline-only and inside a tmp folder for the whole session (its service outlives a test)."""
    root = tmp_path_factory.mktemp("wandb_home")
    env = {
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root / "dir"),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_CONFIG_DIR": str(root / "config"),
        "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_ARTIFACT_DIR": str(root / "artifacts"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_MODE", raising=False)
        yield root


@pytest.fixture
def train_run(tmp_path):
    """train_run(*overrides, name="run") -> (results, out_dir): compose TINY + overrides and train in-process."""
    from onthefly.config import compose
    from onthefly.engine.run import run

    def _run(*overrides: str, name: str = "run"):
        out_dir = tmp_path / name
        results = run(compose([*TINY, *overrides]), out_dir)
        return results, out_dir

    return _run


def read_metrics(out_dir: Path) -> pd.DataFrame:
    return pd.read_csv(Path(out_dir) / "metrics.csv")


def read_results(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "results.json").read_text())


def epoch_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The per-epoch rows of metrics.csv (the final test row has no train/val numbers)."""
    return metrics[metrics["epoch"] < EPOCHS]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.pop("WANDB_API_KEY", None)
    env["HYDRA_FULL_ERROR"] = "0"
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny tensor ops (far slower with several threads on a busy 2-core machine);
    a module takes it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
