"""What a run leaves behind when W&B is unavailable or switched off, and when training breaks."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import EPOCHS, read_metrics, read_results
from onthefly.engine.errors import TrainingError
from onthefly.engine.trainer import Trainer
from onthefly.logging.sinks import wandb_logged_in


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No API key anywhere W&B looks: env, ~/.netrc, its settings folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb_config"))
    return home


@pytest.mark.slow
def test_online_without_login_falls_back_to_offline(train_run, no_wandb_login):
    assert not wandb_logged_in(), "the sandbox still finds a W&B login; this test would go online"
    with pytest.warns(UserWarning, match="logger.mode=online but W&B has no login: logging offline"):
        results, out = train_run("logger.mode=online")
    assert results["status"] == "ok"
    assert read_results(out)["status"] == "ok"
    assert len(read_metrics(out)) == EPOCHS + 1
    assert (out / "steps.csv").is_file() and (out / "config.yaml").is_file()
    offline = list((out / "wandb").glob("offline-run-*"))
    online = list((out / "wandb").glob("run-*"))
    assert len(offline) == 1 and not online, f"offline runs {offline}, online runs {online}"
    assert read_results(out)["wandb"]["id"] in offline[0].name


def test_disabled_writes_no_wandb_folder(train_run):
    results, out = train_run("logger.mode=disabled")
    assert not (out / "wandb").exists()
    saved = read_results(out)
    assert saved["status"] == "ok" and "wandb" not in saved
    assert (out / "metrics.csv").is_file() and (out / "steps.csv").is_file()


def test_log_steps_off_writes_no_steps_csv(train_run):
    _, out = train_run("logger.log_steps=false")
    assert not (out / "steps.csv").exists()
    assert len(read_metrics(out)) == EPOCHS + 1


def test_failure_mid_training_keeps_finished_epochs(train_run, tmp_path, monkeypatch):
    real_train_epoch = Trainer.train_epoch

    def breaks_in_epoch_1(self, epoch):
        if epoch == 1:
            raise RuntimeError("simulated crash in epoch 1")
        return real_train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", breaks_in_epoch_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run("modulation=ogm_ge", "logger.mode=offline")
    out = tmp_path / "run"
    saved = read_results(out)
    assert saved["status"] == "failed"
    assert saved["error"] == "RuntimeError: simulated crash in epoch 1"
    assert saved["epochs_done"] == 1
    assert saved["config"]["modulation"]["ge"] is True
    metrics = read_metrics(out)
    assert list(metrics["epoch"]) == [0] and metrics["val/acc"].notna().all()
    assert "test/acc" not in metrics.columns
    steps = pd.read_csv(out / "steps.csv")
    assert set(steps["epoch"]) == {0}
    assert not (out / "best.pt").exists()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1


def test_nan_loss_stops_the_run_with_advice(train_run, tmp_path):
    # lr=1e30: the first step blows the weights up, every later loss is NaN/Inf; 4 such steps are skipped,
    # the 5th (epoch 1, step 1, with 4 steps per epoch) stops the run.
    with pytest.raises(TrainingError) as info:
        train_run("optim.lr=1e30", "trainer.max_nonfinite_steps=4")
    message = str(info.value)
    assert "NaN/Inf in 5 steps" in message and "epoch 1, step 1" in message
    assert "lower optim.lr" in message and "trainer.grad_clip" in message
    out = tmp_path / "run"
    saved = read_results(out)
    assert saved["status"] == "failed" and saved["error"].startswith("TrainingError: loss was NaN/Inf")
    assert saved["epochs_done"] == 1
    assert list(read_metrics(out)["epoch"]) == [0]
    json.loads((out / "results.json").read_text(), parse_constant=_no_nan)  # strict JSON: no NaN tokens


def test_few_nonfinite_steps_are_skipped_not_fatal(train_run, monkeypatch):
    """A handful of bad batches are dropped (no optimizer step) and counted; the run carries on."""
    import torch.nn.functional as F

    import onthefly.tasks as tasks  # the loop's loss comes from the task

    real = F.cross_entropy
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(tasks.F, "cross_entropy", nan_on_second_call)
    results, out = train_run("trainer.max_nonfinite_steps=1")
    assert results["status"] == "ok" and results["nonfinite_steps"] == 1
    saved = read_results(out)
    assert saved["nonfinite_steps"] == 1
    steps = pd.read_csv(out / "steps.csv")
    assert steps["train/loss"].isna().sum() == 1 and steps["train/loss"].notna().sum() == len(steps) - 1
    # the epoch mean of train/loss is NaN now; results.json must still be strict JSON (NaN written as null)
    strict = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    assert strict["status"] == "ok"


def _no_nan(token):
    raise AssertionError(f"results.json holds {token}")
