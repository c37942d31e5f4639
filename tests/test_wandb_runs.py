"""What W&B records for a run, read back from its offline files and held against steps.csv, metrics.csv and
results.json; the run's identity (name, group, job type, choices); analyses in runs of their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict

from onthefly.engine.errors import TrainingError
from onthefly.engine.identity import identify

from conftest import EPOCHS, STEPS_PER_EPOCH, TINY, read_results, subprocess_env
from wandb_file import read_run

METHODS = ("ogm", "ogm_ge")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python -m onthefly.train -m modulation=ogm,ogm_ge` with offline W&B and the end-of-run plots."""
    cwd = tmp_path_factory.mktemp("sweep_cwd")
    env = subprocess_env()
    env.pop("WANDB_SERVICE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "onthefly.train",
            "-m",
            f"modulation={','.join(METHODS)}",
            *TINY,
            "logger.mode=offline",
            "trainer.plots=true",
            "hydra.sweep.dir=sweep",
            "hydra.sweep.subdir=${hydra.job.num}",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "sweep"


def _job(sweep: Path, method: str) -> tuple[Path, object]:
    (run_dir,) = [
        p.parent for p in sweep.glob("*/results.json") if read_results(p.parent)["choices"]["modulation"] == method
    ]
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    return run_dir, read_run(offline)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_wandb_history_and_summary_are_the_local_files(sweep, method):
    run_dir, rec = _job(sweep, method)
    steps = pd.read_csv(run_dir / "steps.csv")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    results = read_results(run_dir)
    assert rec.exit_code == 0

    # per step: train/* at W&B step = global step, the values of steps.csv (an epoch row no longer overwrites them)
    step_rows = [r for r in rec.history if any(k.startswith("train/") for k in r)]
    assert [r["_step"] for r in step_rows] == list(steps["step"]) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for row, (_, expected) in zip(step_rows, steps.iterrows()):
        for column in [c for c in steps.columns if c.startswith("train/")]:
            assert row[column] == expected[column], (row["_step"], column)
    assert {"train/k_audio", "train/k_visual", "train/rho_audio"} <= set(step_rows[0])

    # per epoch: the epoch means under train_epoch/*, val/* and lr, x-axis `epoch`; no test point in the history
    epoch_rows = [r for r in rec.history if "epoch" in r]
    per_epoch = metrics[metrics["epoch"] < EPOCHS]
    assert [r["epoch"] for r in epoch_rows] == list(per_epoch["epoch"]) == list(range(EPOCHS))
    for row, (_, expected) in zip(epoch_rows, per_epoch.iterrows()):
        for column in [c for c in metrics.columns if c.startswith(("train/", "val/"))]:
            key = "train_epoch/" + column[len("train/") :] if column.startswith("train/") else column
            assert row[key] == expected[column], (row["epoch"], key)
        assert row["train_epoch/lr"] == expected["lr"]
        assert row["_step"] == (row["epoch"] + 1) * STEPS_PER_EPOCH
    assert not [k for r in rec.history for k in r if k.startswith("test/")]
    assert {p: rec.metrics[p] for p in ("val/*", "train_epoch/*")} == {"val/*": "epoch", "train_epoch/*": "epoch"}

    # summary: the selected checkpoint (its epoch, its val numbers, its test numbers), not the last epoch
    best = results["best"]
    chosen = per_epoch[per_epoch["epoch"] == best["epoch"]].iloc[0]
    assert rec.summary["best/epoch"] == best["epoch"] and rec.summary["best/score"] == best["score"]
    assert rec.summary["val/acc"] == chosen["val/acc"] == best["score"]
    assert {k: rec.summary[f"test/{k}"] for k in results["test"]} == results["test"]

    # the figures in one history row; best.pt as the run's model artifact
    image_rows = [r for r in rec.history if any(k.startswith("plots/") for k in r)]
    assert len(image_rows) == 1 and {"plots/rho", "plots/k"} <= set(image_rows[0])
    (artifact,) = rec.artifacts
    assert (artifact.type, artifact.name) == ("model", f"model-{results['wandb']['id']}")
    assert {"best", f"epoch-{best['epoch']}"} <= set(artifact.aliases)
    assert any(entry.path == "best.pt" for entry in artifact.manifest.contents)


@pytest.mark.slow
def test_sweep_runs_share_a_group_and_are_named_by_their_method(sweep):
    for method in METHODS:
        run_dir, rec = _job(sweep, method)
        assert rec.run.run_group == "sweep"  # the sweep's folder (relative to where it ran)
        assert rec.run.job_type == method  # the config choice: ogm and ogm_ge are told apart
        assert rec.run.display_name == f"synth_av-concat-{method}-s0"
        assert rec.config["choices"]["modulation"] == method and rec.config["choices"]["dataset"] == "synth_av"
        saved = read_results(run_dir)
        assert (saved["wandb"]["group"], saved["wandb"]["job_type"]) == ("sweep", method)
        assert saved["config"]["logger"]["name"] == rec.run.display_name


# --- identity from a Hydra job's config (no run needed) ----------------------------------------------------------
def _hydra_job(
    overrides: list[str], mode: str = "RUN", sweep_overrides: list[str] | None = None, out: Path | None = None
):
    """(cfg, its Hydra node) as Hydra hands them to a job; in MULTIRUN with the sweep's multirun.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from onthefly.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    hydra = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    hydra.mode = mode
    if mode == "MULTIRUN":
        hydra.sweep.subdir = "3_job"
        hydra.runtime.output_dir = str(out / "3_job")
        sweep = OmegaConf.create({"hydra": {"overrides": {"task": sweep_overrides}}})
        OmegaConf.save(sweep, out / "multirun.yaml")
    return cfg, hydra


def test_sweep_name_holds_every_swept_key_and_the_group_is_the_sweep(tmp_path):
    job = ["modulation=ogm_ge", "seed=1", "optim.lr=0.02", "dataset.num_train=64", "trainer.num_workers=2"]
    swept = ["modulation=ogm,ogm_ge", "seed=0,1", "optim.lr=0.01,0.02", "dataset.num_train=64", "trainer.num_workers=2"]
    (tmp_path / "multirun" / "day" / "time").mkdir(parents=True)
    cfg, hydra = _hydra_job(
        [*job, f"paths.output_root={tmp_path}"], "MULTIRUN", swept, tmp_path / "multirun" / "day" / "time"
    )
    who = identify(cfg, hydra)
    assert who.name == "synth_av-concat-ogm_ge-s1 optim.lr=0.02"  # num_train and workers are not swept
    assert who.group == "multirun/day/time" and who.job_type == "ogm_ge"
    assert who.choices["modulation"] == "ogm_ge" and who.choices["backbone"] == "resnet18_small"


def test_single_run_is_named_by_its_choices_and_has_no_group():
    cfg, hydra = _hydra_job(["modulation=ogm", "modulation.alpha=0.3", "seed=2", "trainer.num_workers=2"])
    who = identify(cfg, hydra)
    assert (who.name, who.group, who.job_type) == ("synth_av-concat-ogm-s2", None, "ogm")


def test_logger_settings_win_over_the_derived_identity():
    cfg, hydra = _hydra_job(
        ["modulation=ogm", "logger.name=mine", "logger.group=g", "logger.job_type=j", "logger.tags=[a,b]"]
    )
    who = identify(cfg, hydra)
    assert (who.name, who.group, who.job_type, who.tags) == ("mine", "g", "j", ["a", "b"])


def test_top_level_name_is_a_deprecated_alias_of_logger_name():
    cfg, hydra = _hydra_job(["name=old"])
    with pytest.warns(FutureWarning, match=r"name='old'.*deprecated; set the run name with logger.name='old'"):
        assert identify(cfg, hydra).name == "old"
    cfg, hydra = _hydra_job(["name=old", "logger.name=new"])
    with pytest.raises(TrainingError, match="set the run name with logger.name only"):
        identify(cfg, hydra)


def test_without_hydra_the_identity_falls_back_to_class_names():
    from onthefly.config import compose

    who = identify(compose([*TINY, "modulation=ogm_ge"]))
    assert (who.name, who.job_type, who.choices) == ("SynthAV-ConcatFusion-OGM-s0", "OGM", {})


# --- analyses: a W&B run of their own, never a second copy of the training run --------------------------------
@pytest.mark.slow
def test_an_analysis_logs_to_its_own_run_beside_the_training_run(train_run):
    from onthefly.analyse import analyse

    _, out = train_run("modulation=ogm_ge", "logger.mode=offline", "logger.group=g1")
    trained = read_results(out)["wandb"]
    analyse("estimator", out, device="cpu")
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    assert sum(trained["id"] in f.name for f in folders) == 1, "the training run's id was opened a second time"
    (other,) = [f for f in folders if trained["id"] not in f.name]
    rec = read_run(other)
    assert (rec.run.job_type, rec.run.run_group) == ("analysis", "g1")
    assert rec.run.display_name == f"{trained['name']}:estimator"
    assert rec.config["analysed_run"] == trained["id"] and rec.config["analysis"] == "estimator"
    estimator = json.loads((out / "estimator.json").read_text())
    assert {k: rec.summary[f"estimator/{k}"] for k in estimator} == estimator
