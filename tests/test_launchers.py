"""Hydra launcher presets (conf/hydra/launcher/): serial (basic), parallel (joblib), local (submitit, run here) and\nslurm (submitit, composed and rendered to its sbatch script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from onthefly.config import CONF_DIR, register_configs

from conftest import TINY, subprocess_env


def _hydra_cfg(*overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_preset_composes_and_renders_a_requeueable_gpu_job(tmp_path, monkeypatch):
    """The preset's settings reach the sbatch script that submitit would submit (sbatch itself is not run)."""
    from submitit.slurm import slurm

    cfg = _hydra_cfg(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.tasks_per_node=4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.job.name=otf",
    )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher_cfg.timeout_min == 1440 and launcher_cfg.max_num_timeout == 10
    assert launcher_cfg.additional_parameters == {"requeue": True}

    rendered = {}

    class Submitted(Exception):
        pass

    def capture(self, command):
        rendered["sbatch"] = self._make_submission_file_text(command, "uid")
        raise Submitted

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    monkeypatch.setattr(slurm.SlurmExecutor, "_submit_command", capture)
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    script = rendered["sbatch"]
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --time=1440",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --array=0-1%2",
        "#SBATCH --job-name=otf",
    ):
        assert line in script, f"{line!r} not in the sbatch script:\n{script}"


def test_serial_preset_is_hydras_basic_launcher():
    cfg = _hydra_cfg("hydra/launcher=serial")
    assert cfg.hydra.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def test_joblib_preset_composes():
    cfg = _hydra_cfg("hydra/launcher=parallel", "hydra.launcher.n_jobs=2")
    assert cfg.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2 and cfg.hydra.launcher.prefer == "processes"


def _sweep(tmp_path: Path, launcher: str, *extra: str) -> subprocess.CompletedProcess:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "onthefly.train",
        "-m",
        f"hydra/launcher={launcher}",
        *extra,
        "seed=0,1",
        *TINY,
        "trainer.epochs=1",
        f"hydra.sweep.dir={sweep}",
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=500)


def _job_results(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]


@pytest.mark.slow
def test_submitit_local_two_job_sweep(tmp_path):
    proc = _sweep(tmp_path, "local")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = _job_results(tmp_path)
    assert sorted(r["config"]["seed"] for r in results) == [0, 1]
    assert all(r["status"] == "ok" for r in results)
    assert list((tmp_path / "sweep" / ".submitit").iterdir()), "submitit kept no job folder"


@pytest.mark.slow
def test_joblib_two_job_sweep(tmp_path):
    proc = _sweep(tmp_path, "parallel", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = _job_results(tmp_path)
    assert sorted(r["config"]["seed"] for r in results) == [0, 1]
    assert all(r["status"] == "ok" for r in results)
