"""The command lines: `python -m onthefly.train` (Hydra, single run and sweep) and `python -m onthefly.analyse`
(`onthefly.evaluate` is its deprecated alias)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onthefly import analyse as evaluate_cli
from onthefly.engine import analysis

from conftest import TINY, read_results, subprocess_env

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _python(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


# --- python -m onthefly.train ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_cli_single_run(tmp_path):
    run_dir = tmp_path / "cli_run"
    proc = _python("-m", "onthefly.train", *TINY, "modulation=ogm_ge", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = read_results(run_dir)
    assert saved["status"] == "ok" and 0 <= saved["test"]["acc"] <= 1
    assert saved["config"]["logger"]["name"] == "synth_av-concat-ogm_ge-s0"  # the default name from the group choices
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "config.yaml").is_file()
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert "test/acc" in (proc.stdout + proc.stderr)
    assert not (tmp_path / "outputs").exists(), "the run wrote outside hydra.run.dir"


@pytest.mark.slow
def test_train_cli_misspelt_key_names_the_key(tmp_path):
    proc = _python(
        "-m",
        "onthefly.train",
        *TINY,
        "modulation=ogm",
        "modulation.alpah=1",
        f"hydra.run.dir={tmp_path / 'never'}",
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "alpah" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "never" / "results.json").exists()


@pytest.mark.slow
def test_train_cli_training_error_exits_1_with_the_reason(tmp_path):
    run_dir = tmp_path / "uni"
    proc = _python(
        "-m",
        "onthefly.train",
        *TINY,
        "trainer.modalities=[audio]",
        "modulation=ogm_ge",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "use modulation=none for uni-modal runs" in output
    assert "Traceback" not in output, "a TrainingError should be one log line, not a traceback"


@pytest.mark.slow
def test_train_cli_multirun_makes_one_folder_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _python(
        "-m", "onthefly.train", "-m", "fusion=concat,sum", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2, f"job folders: {sorted(p.name for p in sweep.iterdir())}"
    fusions = sorted(json.loads(p.read_text())["config"]["fusion"]["_target_"].rsplit(".", 1)[-1] for p in results)
    assert fusions == ["ConcatFusion", "SumFusion"]
    assert all(json.loads(p.read_text())["status"] == "ok" for p in results)
    assert {p.parent.name.split("_", 1)[0] for p in results} == {"0", "1"}


@pytest.mark.slow
def test_train_cli_multirun_a_failing_job_fails_alone(tmp_path):
    """The middle job names a modality the dataset lacks (an error while building): the jobs after it still run,
    its folder holds results.json with status failed and the error, and the multirun exits non-zero with the
    one-line reason (no traceback)."""
    sweep = tmp_path / "sweep"
    proc = _python(
        "-m",
        "onthefly.train",
        "-m",
        "trainer.modalities=[audio],[foo],[visual]",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    results = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(results) == [0, 1, 2]
    assert results[0]["status"] == "ok" and results[2]["status"] == "ok"
    assert results[1]["status"] == "failed"
    assert results[1]["error"] == (
        "TrainingError: trainer.modalities names ['foo'], but the dataset has ['audio', 'visual']"
    )
    assert results[1]["config"]["trainer"]["modalities"] == ["foo"]
    assert "trainer.modalities names ['foo']" in proc.stderr and "Traceback" not in proc.stderr


def test_record_failure_replaces_a_stale_record_and_keeps_the_runs_own(tmp_path):
    import os
    import time

    from onthefly.config import compose
    from onthefly.train import record_failure

    cfg = compose([*TINY])
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"status": "ok", "test": {"acc": 0.9}}))  # left by an earlier attempt
    os.utime(path, (time.time() - 100, time.time() - 100))
    record_failure(tmp_path, cfg, ValueError("bad value"), since=time.time() - 10)
    saved = json.loads(path.read_text())
    assert saved["status"] == "failed" and saved["error"] == "ValueError: bad value" and saved["epochs_done"] == 0
    assert saved["config"]["trainer"]["epochs"] == 2
    path.write_text(json.dumps({"status": "failed", "error": "TrainingError: loss was NaN", "epochs_done": 3}))
    record_failure(tmp_path, cfg, ValueError("other"), since=time.time() - 10)  # the run wrote it just now: kept
    assert json.loads(path.read_text())["epochs_done"] == 3


# --- python -m onthefly.analyse -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run folder with a checkpoint, made in-process (OPM+OGM, so steps.csv has rho, k and q)."""
    from onthefly.config import compose
    from onthefly.engine.run import run

    out = tmp_path_factory.mktemp("eval") / "run"
    results = run(compose([*TINY, "modulation=opm_ogm", "trainer.save_checkpoint=true"]), out)
    assert (out / "best.pt").is_file()
    assert not (out / "plots" / "rho.png").exists()  # trainer.plots=false: the plots command must draw it
    return out, results


def test_evaluate_probe(finished_run, capsys):
    run_dir, _ = finished_run
    assert evaluate_cli.main(["probe", f"run_dir={run_dir}", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert "probe/acc_audio:" in printed and "probe/acc_visual:" in printed
    probe = json.loads((run_dir / "probe.json").read_text())
    assert set(probe) == {"audio", "visual"}
    for m, entry in probe.items():
        assert 0 <= entry["acc"] <= 1 and 0 <= entry["val_acc"] <= 1 and entry["l2"] > 0, (m, entry)
        assert f"probe/acc_{m}: {entry['acc']:.4f}" in printed


def test_evaluate_robustness(finished_run, capsys):
    run_dir, results = finished_run
    assert evaluate_cli.main(["robustness", f"run_dir={run_dir}", "device=cpu"]) == 0
    saved = json.loads((run_dir / "robustness.json").read_text())
    assert saved["ratios"] == pytest.approx([i / 10 for i in range(11)])
    assert set(saved["acc"]) == {"audio", "visual"}
    for m, accs in saved["acc"].items():
        assert len(accs) == 11 and all(0 <= a <= 1 for a in accs)
        # r = 0 removes nothing: the fused test accuracy of the very model the run reported
        assert accs[0] == pytest.approx(results["test"]["acc"], abs=1e-9), m
    png = run_dir / "plots" / "robustness.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"plot: {png}" in capsys.readouterr().out


def test_evaluate_plots(finished_run, capsys):
    run_dir, _ = finished_run
    assert evaluate_cli.main(["plots", f"run_dir={run_dir}"]) == 0
    for name in ("rho", "k", "q"):
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name
    assert str(run_dir / "plots" / "rho.png") in capsys.readouterr().out


def test_load_run_restores_the_best_weights(finished_run):
    run_dir, results = finished_run
    cfg, model, splits, dev = analysis.load_run(run_dir, "cpu")
    assert model.modalities == results["modalities"] and str(dev) == "cpu"
    curves = analysis.robustness(model, splits, dev, ratios=(0.0, 1.0))
    assert curves["audio"][0] == pytest.approx(results["test"]["acc"], abs=1e-9)


@pytest.mark.parametrize("command", ["probe", "robustness", "plots"])
def test_evaluate_without_run_dir_says_so(command, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate_cli.main([command])
    assert info.value.code != 0
    assert "run_dir=PATH is required" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["probe", "robustness", "plots"])
def test_evaluate_with_a_missing_folder_says_so(command, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit) as info:
        evaluate_cli.main([command, f"run_dir={missing}"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert f"run_dir={missing}" in err and "not a folder" in err


def test_evaluate_on_a_folder_without_checkpoint_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FileNotFoundError, match=r"best\.pt not found: run_dir must be a finished run folder"):
        evaluate_cli.main(["probe", f"run_dir={tmp_path}", "device=cpu"])


def test_evaluate_cli_exit_code_for_missing_run_dir(tmp_path):
    """Through the real entry point: non-zero exit and a one-line reason naming run_dir."""
    proc = _python("-m", "onthefly.analyse", "plots", f"run_dir={tmp_path / 'gone'}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "run_dir=" in proc.stderr and "gone" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_is_a_deprecated_alias_of_analyse(finished_run):
    run_dir, _ = finished_run
    proc = _python("-m", "onthefly.evaluate", "plots", f"run_dir={run_dir}", cwd=run_dir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" in proc.stderr and "python -m onthefly.analyse" in proc.stderr
    assert "rho.png" in proc.stdout


# --- a run folder is data: nothing in it runs -------------------------------------------------------------------
class _Payload:
    """Unpickling this writes a marker file: the proof that a planted pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "payload ran"))


@pytest.mark.parametrize("key", ["dataset", "fusion"])
def test_a_planted_target_in_a_run_folder_is_refused_and_nothing_runs(finished_run, tmp_path, key):
    import pickle
    import shutil

    import yaml

    run_dir, _ = finished_run
    planted = tmp_path / "planted_run"
    shutil.copytree(run_dir, planted)
    marker, pkl = tmp_path / "marker.txt", tmp_path / "payload.pkl"
    pkl.write_bytes(pickle.dumps(_Payload(str(marker))))
    config = yaml.safe_load((planted / "config.yaml").read_text())
    config[key] = {"_target_": "pandas.read_pickle", "filepath_or_buffer": str(pkl)}
    (planted / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match=rf"{key}\._target_='pandas\.read_pickle' is not one of onthefly's registered"):
        analysis.load_run(planted, "cpu")
    assert not marker.exists()
    proc = _python("-m", "onthefly.analyse", "probe", f"run_dir={planted}", "device=cpu", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and f"{key}._target_" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
