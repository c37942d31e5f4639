"""Hyperparameter search (`hparams_search=…`, Optuna through hydra-optuna-sweeper): trials run, the best value is
reported, a failed trial does not stop the study, and the trials share one W&B group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY, subprocess_env


def _search(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "onthefly.train",
        "-m",
        *overrides,
        "dataset=synth_av",
        *TINY,
        f"hydra.sweep.dir={tmp_path / 'search'}",
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=500)


def _trials(tmp_path: Path) -> dict[int, dict]:
    return {
        int(p.parent.name.removeprefix("trial")): json.loads(p.read_text())
        for p in (tmp_path / "search").glob("trial*/results.json")
    }


@pytest.mark.slow
def test_three_trial_search_of_ogm_alpha_reports_the_best_val_accuracy(tmp_path):
    proc = _search(tmp_path, "hparams_search=ogm_alpha", "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    trials = _trials(tmp_path)
    assert sorted(trials) == [0, 1, 2] and all(t["status"] == "ok" for t in trials.values())
    alphas = {t["config"]["modulation"]["alpha"] for t in trials.values()}
    assert len(alphas) == 3 and all(0.05 <= a <= 5.0 for a in alphas)  # three different α in the searched range
    assert all(t["config"]["modulation"]["ge"] for t in trials.values())  # OGM-GE
    groups = {t["config"]["logger"]["group"] for t in trials.values()}
    assert len(groups) == 1 and groups.pop().startswith("search-ogm_alpha-synth_av-")
    # the study maximised what each trial returned: its selected checkpoint's val accuracy
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(t["best"]["score"] for t in trials.values()))
    winner = next(t for t in trials.values() if t["best"]["score"] == best["best_value"])
    assert best["best_params"]["modulation.alpha"] == pytest.approx(winner["config"]["modulation"]["alpha"])
    assert f"Best value: {best['best_value']}" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_failed_trial_does_not_stop_the_study(tmp_path):
    """Trials that pick an invalid setting fail (results.json says why); the others run and the best is reported."""
    proc = _search(
        tmp_path,
        "hparams_search=lr",
        "trainer.channels_last=choice(auto,bogus)",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.n_trials=4",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    trials = _trials(tmp_path)
    assert len(trials) == 4
    states = {t["config"]["trainer"]["channels_last"]: t["status"] for t in trials.values()}
    assert states == {"auto": "ok", "bogus": "failed"}  # both kinds were drawn
    failed = [t["error"] for t in trials.values() if t["status"] == "failed"]
    assert all("channels_last" in error and "bogus" in error for error in failed)
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    assert best["best_params"]["trainer.channels_last"] == "auto"
