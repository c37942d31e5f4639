"""What a run leaves behind when W&B is unavailable or switched off, and when training breaks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from onthefly.engine.errors import TrainingError
from onthefly.engine.trainer import Trainer
from onthefly.logging.sinks import wandb_logged_in

from conftest import EPOCHS, STEPS_PER_EPOCH, read_metrics, read_results


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
    # the skipped step stays out of the epoch means: the epoch's train/loss is the mean of its finite steps
    metrics = read_metrics(out).dropna(subset=["train/loss"])
    by_epoch = steps.dropna(subset=["train/loss"]).groupby("epoch")["train/loss"].mean()
    assert len(metrics) == len(by_epoch)
    for _, row in metrics.iterrows():
        assert row["train/loss"] == pytest.approx(by_epoch[int(row["epoch"])], rel=1e-6)
    # results.json must be strict JSON (a NaN anywhere would be written as null)
    strict = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    assert strict["status"] == "ok"


def _no_nan(token):
    raise AssertionError(f"results.json holds {token}")


# --- steps.csv is written as the steps come ---------------------------------------------------------------------
def test_nan_abort_in_epoch_0_keeps_the_steps_that_led_to_it(train_run, tmp_path):
    # lr=1e30: step 1 is finite and blows the weights up; step 2 is NaN (skipped, 1 allowed), step 3 stops the run
    with pytest.raises(TrainingError, match="NaN/Inf in 2 steps"):
        train_run("optim.lr=1e30", "trainer.max_nonfinite_steps=1")
    out = tmp_path / "run"
    assert read_results(out)["epochs_done"] == 0 and not (out / "metrics.csv").exists()
    steps = pd.read_csv(out / "steps.csv")
    assert list(steps["step"]) == [1, 2] and list(steps["epoch"]) == [0, 0]
    assert pd.notna(steps["train/loss"].iloc[0]) and pd.isna(steps["train/loss"].iloc[1])


def test_steps_csv_grows_during_the_epoch(train_run, tmp_path, monkeypatch):
    """Rows reach the file every STEPS_FLUSH_ROWS steps (here 2), not at the epoch's end."""
    from onthefly.logging import sinks

    monkeypatch.setattr(sinks, "STEPS_FLUSH_ROWS", 2)
    seen = {}
    real = Trainer.train_step

    def watching(self, ctx, *args):
        path = tmp_path / "run" / "steps.csv"
        seen[self.global_step] = len(pd.read_csv(path)) if path.exists() else 0
        return real(self, ctx, *args)

    monkeypatch.setattr(Trainer, "train_step", watching)
    train_run()
    # before global step g runs, the g previous rows are on disk but for fewer than 2 pending ones
    assert seen == {0: 0, 1: 0, 2: 2, 3: 2, 4: 4, 5: 4, 6: 6, 7: 6}
    assert len(pd.read_csv(tmp_path / "run" / "steps.csv")) == EPOCHS * STEPS_PER_EPOCH


# --- the W&B helper process dies mid-run: warned once, the run finishes on its local files --------------------
KILL_WANDB_CORE = """
import os, signal, sys
from onthefly.engine.trainer import Trainer

def wandb_core_children():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        if int(rest.split()[1]) == os.getpid() and name.startswith("wandb-core"):
            found.append(int(pid))
    return found

real = Trainer.train_step
def killing(self, *args, **kwargs):
    if self.global_step == 3:
        for pid in wandb_core_children():
            os.kill(pid, signal.SIGKILL)
            print("killed wandb-core", pid, flush=True)
    return real(self, *args, **kwargs)
Trainer.train_step = killing

from onthefly.train import main
sys.argv = ["onthefly.train", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_wandb_helper_killed_mid_run_does_not_stop_training(tmp_path):
    import subprocess
    import sys

    from conftest import TINY, subprocess_env

    env = subprocess_env()
    env.pop("WANDB_SERVICE", None)  # the run starts (and owns) its own wandb-core, as any job does
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_WANDB_CORE,
            *TINY,
            "logger.mode=offline",
            "trainer.plots=true",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "killed wandb-core" in proc.stdout, "no wandb-core child was found to kill: " + proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("W&B stopped working") == 1, proc.stderr[-3000:]
    saved = read_results(run_dir)
    assert saved["status"] == "ok" and "ConnectionResetError" in saved["wandb"]["error"]
    assert len(read_metrics(run_dir)) == EPOCHS + 1
    assert list(pd.read_csv(run_dir / "steps.csv")["step"]) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert (run_dir / "best.pt").is_file() and (run_dir / "plots" / "rho.png").is_file()


# --- W&B login and modes: the decision, never a connection ---------------------------------------------------
FAKE_KEY = "0123456789abcdef" * 2 + "01234567"  # the 40-character shape of a W&B API key


def test_a_key_saved_like_wandb_login_does_counts_as_a_login(no_wandb_login):
    import netrc

    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    assert not wandb_logged_in()
    base_url = wandb_setup.singleton().settings.base_url
    wbauth.write_netrc_auth(host=base_url, api_key=FAKE_KEY)  # what `wandb login` does with the key you paste
    assert wandb_logged_in()
    # the entry is under the configured server's host, which is not api.wandb.ai for this wandb: a check of
    # netrc's api.wandb.ai entry (the old one) found no login here
    assert netrc.netrc(str(no_wandb_login / ".netrc")).authenticators("api.wandb.ai") is None


def test_an_api_key_in_the_environment_counts_as_a_login(no_wandb_login, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_logged_in()


def test_online_without_a_server_waits_a_bounded_time_then_logs_offline(no_wandb_login, monkeypatch, tmp_path):
    import wandb
    from wandb.errors import CommError

    from onthefly.logging import sinks

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    calls, real_init = [], wandb.init

    def init(**kwargs):  # the server is unreachable: what wandb.init raises once its init timeout has passed
        calls.append(kwargs)
        if kwargs["mode"] == "online":
            raise CommError("Timed out while retrying: dial tcp: lookup api.example: no such host")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    with pytest.warns(UserWarning) as caught:
        run, mode = sinks.open_wandb_run(tmp_path, {}, {"mode": "online", "project": "p"})
    try:
        assert mode == "offline" and [c["mode"] for c in calls] == ["online", "offline"]
        assert calls[0]["settings"].init_timeout == sinks.INIT_TIMEOUT_S == 30
        (warning,) = [str(w.message) for w in caught]
        where = tmp_path / "wandb" / f"offline-run-{Path(run.dir).parent.name.split('-', 2)[2]}"
        assert "\n" not in warning and "logs OFFLINE" in warning and f"`wandb sync {where}`" in warning
    finally:
        run.finish()


def _no_debug(*overrides: str) -> list[str]:
    """TINY without debug=fast (which sets logger.mode itself), with the rest of what it sets."""
    from conftest import TINY

    return [o for o in TINY if o != "debug=fast"] + ["trainer.device=cpu", "trainer.progress=false", *overrides]


@pytest.mark.parametrize(
    "env, explicit, expected",
    [
        ("disabled", None, "disabled"),
        ("offline", None, "offline"),
        (None, None, "offline"),
        ("offline", "disabled", "disabled"),
        ("disabled", "offline", "offline"),
    ],
)
def test_wandb_mode_in_the_environment_sets_the_default(monkeypatch, env, explicit, expected):
    from onthefly.config import compose

    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    cfg = compose(_no_debug(*([f"logger.mode={explicit}"] if explicit else [])))
    assert cfg.logger.mode.value == expected


@pytest.mark.parametrize("env", ["disabled", "offline"])
def test_wandb_mode_environment_reaches_the_run(monkeypatch, tmp_path, env):
    from onthefly.config import compose
    from onthefly.engine.run import run

    monkeypatch.setenv("WANDB_MODE", env)
    results = run(compose(_no_debug()), tmp_path / "run")
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    if env == "disabled":
        assert "wandb" not in results and not (tmp_path / "run" / "wandb").exists()
    else:
        assert len(offline) == 1 and read_results(tmp_path / "run")["wandb"]["mode"] == "offline"


def test_a_wandb_mode_this_schema_does_not_know_stops_the_run_naming_both_keys(monkeypatch, tmp_path):
    from onthefly.config import compose
    from onthefly.engine.run import run

    monkeypatch.setenv("WANDB_MODE", "dryrun")
    with pytest.raises(
        TrainingError,
        match=r"logger.mode: the environment's WANDB_MODE='dryrun' is not one of "
        r"offline, online, disabled",
    ):
        run(compose(_no_debug()), tmp_path / "run")
    assert not (tmp_path / "run").exists()
