"""Checkpoints and `trainer.resume`: exact continuation (also after SIGKILL), atomic files, clear refusals."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from onthefly.engine import checkpoint as ckpt
from onthefly.engine.errors import CheckpointError, TrainingError

from conftest import TINY, read_metrics, read_results, subprocess_env

# OPM+OGM-GE with q from the previous step: draws random numbers (OPM's coin and masks, the GE noise) and keeps
# state between steps (the previous ρ), so an inexact resume shows in the numbers.
METHOD = ["modulation=opm_ogm", "modulation.opm.q_source=previous"]


def _numbers(out: Path) -> pd.DataFrame:
    metrics = read_metrics(out)
    return metrics.drop(columns=[c for c in metrics.columns if c.startswith("time/")])


def _assert_same_run(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(_numbers(a), _numbers(b), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(a / "steps.csv"), pd.read_csv(b / "steps.csv"), check_exact=True)
    ra, rb = read_results(a), read_results(b)
    assert ra["test"] == rb["test"] and ra["best"] == rb["best"]


def test_resume_from_a_mid_epoch_checkpoint_gives_the_uninterrupted_numbers(train_run, tmp_path):
    # 4 steps per epoch, a checkpoint every 3 steps: global step 3 is in the middle of epoch 0
    _, full = train_run(*METHOD, "trainer.checkpoint_every_n_steps=3", "trainer.keep_checkpoints=10", name="full")
    names = [p.name for p in ckpt.list_checkpoints(full)]
    assert names == ["step-000000008.pt", "step-000000006.pt", "step-000000004.pt", "step-000000003.pt"]
    mid = ckpt.load(ckpt.path_for(full, 3))
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (0, 3, 3)

    # a run folder killed after step 3's checkpoint, whose logs ran on past it (steps.csv is streamed)
    part = _killed_copy(full, tmp_path / "part", 3)
    assert len(pd.read_csv(part / "steps.csv")) == 8, "the copy should hold rows past the checkpoint"
    _, resumed = train_run(*METHOD, "trainer.checkpoint_every_n_steps=3", "trainer.resume=auto", name="part")
    _assert_same_run(full, resumed)


def _killed_copy(full: Path, part: Path, step: int) -> Path:
    """A copy of run folder ``full`` as a kill after the checkpoint at ``step`` could leave it: that checkpoint,
    and the logs as far as they had got (here: all of them; resume must cut them back to the checkpoint)."""
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt.path_for(full, step), part / "checkpoints")
    for name in ("steps.csv", "metrics.csv"):
        shutil.copy(full / name, part / name)
    return part


def test_resume_of_a_finished_run_only_evaluates_again(train_run):
    _, out = train_run("modulation=ogm_ge", name="run")
    before = read_results(out)
    results, _ = train_run("modulation=ogm_ge", "trainer.resume=auto", name="run")
    assert results["test"] == before["test"] and results["best"] == before["best"]
    assert len(read_metrics(out)) == len(_numbers(out))


def test_explicit_checkpoint_path_and_never(train_run, tmp_path):
    _, first = train_run("trainer.checkpoint_every_n_steps=2", "trainer.keep_checkpoints=10", name="first")
    chosen = ckpt.path_for(first, 2)
    results, second = train_run(f"trainer.resume={chosen}", "trainer.checkpoint_every_n_steps=2", name="second")
    _assert_same_run(first, second)
    # never: a folder with checkpoints is trained from scratch (same numbers, since the run is deterministic)
    results, again = train_run("trainer.checkpoint_every_n_steps=2", "trainer.resume=never", name="first")
    assert results["test"] == read_results(second)["test"]


def test_checkpoint_is_written_atomically_and_pruned(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        ckpt.save({"global_step": step, "x": torch.arange(step)}, ckpt.path_for(run, step))
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    ckpt.prune(run, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000000003.pt", "step-000000002.pt"]
    state = ckpt.load(ckpt.path_for(run, 3))
    assert state["format"] == ckpt.FORMAT and torch.equal(state["x"], torch.arange(3))


def test_auto_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    run = tmp_path / "run"
    ckpt.save({"global_step": 2}, ckpt.path_for(run, 2))
    bad = ckpt.path_for(run, 5)
    bad.write_bytes(b"not a zip file at all")
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        path, state = ckpt.find_resume(run, "auto")
    assert path == ckpt.path_for(run, 2) and state["global_step"] == 2


def test_corrupt_checkpoint_fails_naming_the_file(train_run, tmp_path):
    _, out = train_run("trainer.epochs=1", name="run")
    (newest,) = ckpt.list_checkpoints(out)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a truncated file, as a full disk could leave behind
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(newest))}.*corrupt"):
        train_run("trainer.epochs=1", "trainer.resume=auto", name="run")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(newest))}.*corrupt"):
        train_run("trainer.epochs=1", f"trainer.resume={newest}", name="other")


def test_foreign_files_are_refused_naming_the_file(train_run, tmp_path):
    _, out = train_run("trainer.epochs=1", name="run")
    best = out / "best.pt"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(best))} is not an onthefly training checkpoint"):
        train_run("trainer.epochs=1", f"trainer.resume={best}", name="other")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": ckpt.FORMAT, "obj": Path("x")}, pickled)  # needs arbitrary unpickling: refused
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(pickled))} is corrupt or unreadable"):
        ckpt.load(pickled)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "missing.pt")


def test_checkpoint_of_other_settings_is_refused(train_run):
    _, out = train_run("trainer.epochs=1", "modulation=ogm", name="run")
    with pytest.raises(TrainingError, match=r"other settings.*modulation\.ge: False -> True"):
        train_run("trainer.epochs=1", "modulation=ogm_ge", "trainer.resume=auto", name="run")


def test_no_checkpoints_when_keep_is_zero(train_run):
    _, out = train_run("trainer.keep_checkpoints=0")
    assert not (out / "checkpoints").exists()


# --- the real thing: SIGKILL mid-epoch, then trainer.resume=auto ------------------------------------------
# The killed run is slowed down (a sleep before every step, which changes no number) so that the test can kill
# it right after its first checkpoint, in the middle of epoch 0.
SLOW_TRAIN = (
    "import sys, time\n"
    "from onthefly.engine.trainer import Trainer\n"
    "step = Trainer.train_step\n"
    "def slow(self, *a, **k):\n"
    "    time.sleep(0.5)\n"
    "    return step(self, *a, **k)\n"
    "Trainer.train_step = slow\n"
    "from onthefly.train import main\n"
    "sys.argv = ['onthefly.train', *sys.argv[1:]]\n"
    "main()\n"
)


def _own_wandb_env() -> dict:
    """A subprocess environment without this test process's W&B service (WANDB_SERVICE is inherited once the
    pytest process has started W&B): the killed run must own its service, as a preempted job does, or the
    service would still hold its run id when the resumed run asks for it."""
    env = subprocess_env()
    env.pop("WANDB_SERVICE", None)
    return env


# (method, the checkpoint step to kill after, its (epoch, step in epoch)); 4 steps an epoch unless re-sampled. The
# first also checks that the W&B run goes on (W&B's start-up costs seconds, so the others run without it).
KILLS = {
    "opm_ogm": (METHOD, 3, (0, 3)),
    # a method with phases: killed in epoch 1, the rectify phase, whose optimizer is rebuilt on resume
    "reconboost": (["modulation=reconboost", "modulation.boost_epochs=1", "modulation.rectify_epochs=1"], 6, (1, 2)),
    # a method that re-samples the training set: killed in epoch 1, trained on epoch 0's re-sampled plan
    "valuation": (["modulation=valuation", "modulation.warmup=1"], 6, (1, 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KILLS))
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(train_run, tmp_path, kind):
    method, kill_step, position = KILLS[kind]
    wandb = kind == "opm_ogm"
    overrides = [
        *TINY,
        *method,
        "trainer.checkpoint_every_n_steps=3",
        f"logger.mode={'offline' if wandb else 'disabled'}",
    ]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=_own_wandb_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = ckpt.path_for(run_dir, kill_step)
    deadline = time.time() + 240
    try:
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.exists(), (
            f"no checkpoint appeared: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}"
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists(), "the run finished before it was killed"
    newest = ckpt.load(ckpt.list_checkpoints(run_dir)[0])
    assert (newest["epoch"], newest["step_in_epoch"]) == position, "the kill did not land where the test meant it to"
    wandb_id = newest["logger"]["wandb_id"]
    assert bool(wandb_id) == wandb

    resume = subprocess.run(
        [sys.executable, "-m", "onthefly.train", *overrides, "trainer.resume=auto", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=_own_wandb_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "resuming from" in resume.stdout + resume.stderr

    _, reference = train_run(*method, "trainer.checkpoint_every_n_steps=3", name="reference")
    _assert_same_run(reference, run_dir)
    if not wandb:
        return
    assert read_results(run_dir).get("wandb", {}).get("id") == wandb_id, (
        f"the resumed run did not continue W&B run {wandb_id}: {resume.stderr[-2000:]}"
    )
    assert all(wandb_id in p.name for p in (run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_loader_workers_change_no_number_even_across_a_resume(train_run, tmp_path):
    """Augmentation draws from a seed fixed by (seed, epoch, sample): two workers give the numbers of none, also
    when the run resumes mid-epoch."""
    _, inline = train_run(*METHOD, "trainer.checkpoint_every_n_steps=3", "trainer.keep_checkpoints=10", name="inline")
    _killed_copy(inline, tmp_path / "part", 3)
    _, resumed = train_run(
        *METHOD, "trainer.checkpoint_every_n_steps=3", "trainer.num_workers=2", "trainer.resume=auto", name="part"
    )
    _assert_same_run(inline, resumed)


# --- a full disk while writing: said so, the older files stay valid -------------------------------------------
class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: the write past it fails with ENOSPC, as a full disk does."""

    room = 0

    def write(self, data):
        if self.tell() + len(memoryview(data).cast("B")) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _disk_fills_at_write(monkeypatch, n: int, room: int = 100_000) -> list:
    """From the n-th file checkpoint.py writes on, the disk has ``room`` bytes left."""
    opened = []

    def open_(path, mode="r", *args, **kwargs):
        opened.append(Path(path))
        if len(opened) < n:
            return builtins.open(path, mode, *args, **kwargs)
        raw = _FullDisk(path, "wb")
        raw.room = room
        return io.BufferedWriter(raw)

    monkeypatch.setattr(ckpt, "open", open_, raising=False)
    return opened


def test_disk_full_during_a_checkpoint_says_so_and_keeps_the_previous_one(train_run, tmp_path, monkeypatch):
    common = ["trainer.checkpoint_every_n_steps=2", "trainer.keep_checkpoints=10"]
    _disk_fills_at_write(monkeypatch, 2)  # step 2's checkpoint is written, step 4's (epoch end) hits the full disk
    with pytest.raises(CheckpointError) as info:
        train_run(*common)
    out = tmp_path / "run"
    message = str(info.value)
    assert message.startswith(
        f"disk full while writing {ckpt.path_for(out, 4)} (No space left on device): {out / 'checkpoints'} has "
    ), message
    assert re.search(r"the file needs about \d+\.\d MB", message), message
    assert f"the previous checkpoint {ckpt.path_for(out, 2)} is intact" in message
    assert "unexpected pos" not in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000002.pt"], "a partial file was left"
    assert ckpt.load(ckpt.path_for(out, 2))["global_step"] == 2
    saved = read_results(out)
    assert saved["status"] == "failed" and saved["error"].startswith("CheckpointError: disk full while writing")
    assert list(pd.read_csv(out / "steps.csv")["step"]) == [1, 2, 3, 4]  # every step done before the failure

    # space freed: the same command with trainer.resume=auto ends where an uninterrupted run ends
    monkeypatch.undo()
    train_run(*common, "trainer.resume=auto")
    _, reference = train_run(*common, name="reference")
    _assert_same_run(reference, out)


def test_disk_full_while_replacing_a_file_leaves_the_old_one(tmp_path, monkeypatch):
    best = tmp_path / "best.pt"
    ckpt.write_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, best)
    _disk_fills_at_write(monkeypatch, 1, room=0)
    with pytest.raises(
        CheckpointError,
        match=rf"disk full while writing {re.escape(str(best))} .*"
        rf"then run the command again \({re.escape(str(best))} was not changed\)",
    ):
        ckpt.write_atomic({"model": {"w": torch.zeros(10_000)}, "epoch": 2}, best)
    kept = torch.load(best, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
