"""The method interface beyond the step hooks: step strategies, epoch schedules (a phase gets its own optimizer),
re-sampled training sets, epoch_start, the hooks' extra loaders and parameter groups, each exact across a resume.

The toy methods below are plain classes named by `modulation._target_`; they exist to exercise the trainer.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from torch import nn

from onthefly.engine import checkpoint as ckpt
from onthefly.modulation.base import EpochSchedule, JointStep, Modulation, default_param_groups

from conftest import read_metrics, read_results

CALLS: dict[str, list] = {}


class TwoPhases(EpochSchedule):
    def phase(self, epoch: int) -> str:
        return "warm" if epoch == 0 else "main"


class PhasedToy(Modulation):
    """Phase `warm` trains the head alone at lr 0.05; phase `main` trains everything at lr 0.01."""

    def schedule(self):
        return TwoPhases()

    def param_groups(self, model, extra, epoch):
        if epoch == 0:
            return [{"params": list(model.head.parameters()), "lr": 0.05}]
        return [{"params": list(model.parameters()), "lr": 0.01}]

    def epoch_start(self, ctx):
        CALLS.setdefault("epoch_start", []).append(ctx.epoch)


class HalfTheSamples(Modulation):
    """Trains on the even-indexed training clips, the first two of them twice; records the indices each step sees."""

    def train_indices(self, epoch):
        return [0, 2, *range(0, 64, 2)]

    def before_forward(self, ctx):
        CALLS.setdefault("indices", []).extend(ctx.indices.tolist())


class TwoSubSteps(JointStep):
    """A strategy with two optimizer updates per batch: audio alone through the head, then the joint step."""

    def run(self, trainer, ctx):
        def audio_only(c):
            feats = c.model.encode(c.inputs, c)
            feats = {**feats, "visual": torch.zeros_like(feats["visual"])}
            c.logits = c.model.head(feats)
            return nn.functional.cross_entropy(c.logits, c.labels)

        loss = trainer.forward(ctx, audio_only)
        trainer.backward(loss)
        first = trainer.update(ctx, loss)
        ctx.metrics.clear()
        values = super().run(trainer, ctx)
        values["first_loss"] = first["loss"]
        CALLS.setdefault("substeps", []).append(2)
        return values


class SubStepToy(Modulation):
    def step_strategy(self):
        return TwoSubSteps()


class TaggedCopies(Modulation):
    """Adds two tagged copies of sample 5 (5 + 64 and 5 + 128) and reports an epoch-level scalar at each epoch end."""

    def train_indices(self, epoch):
        return [*range(64), 5 + 64, 5 + 128]

    def before_forward(self, ctx):
        CALLS.setdefault("seen", []).extend(zip(ctx.indices.tolist(), ctx.labels.tolist()))
        CALLS.setdefault("sizes", set()).add((ctx.steps_in_epoch, ctx.train_size))

    def epoch_end(self, ctx):
        ctx.metrics["twice_epoch"] = torch.tensor(2.0 * ctx.epoch)


class LoaderProbe(Modulation):
    """Reads the hooks' loaders once before training."""

    def train_start(self, ctx):
        seen = [idx for _, _, idx in ctx.batches("train_eval", None, True)]
        CALLS["train_eval"] = torch.cat(seen).tolist()
        CALLS["val_batches"] = sum(1 for _ in ctx.batches("val"))


class RandomDrop(Modulation):
    """Drops the audio features of random samples (draws from the global RNG every step)."""

    def on_features(self, ctx):
        feat = ctx.features["audio"]
        keep = torch.rand(feat.shape[0], 1, device=feat.device) > 0.3
        ctx.features = {**ctx.features, "audio": torch.where(keep, feat, torch.zeros_like(feat))}


class PrerequisiteToy(RandomDrop):
    """RandomDrop after one plain one-epoch audio-only run; records the batch counts the hooks see."""

    def prerequisites(self):
        return {"warm": {"trainer.modalities": ["audio"], "trainer.epochs": 1}}

    def use_prerequisites(self, runs):
        CALLS.setdefault("prerequisites", []).append(runs)

    def train_start(self, ctx):
        CALLS["num_batches"] = {s: ctx.num_batches(s) for s in ("train", "train_eval", "val")}


@pytest.fixture(autouse=True)
def _fresh_calls():
    CALLS.clear()


def _toy(name: str) -> str:
    return f"modulation._target_={__name__}.{name}"


def test_a_schedule_phase_gets_its_own_optimizer_and_epoch_start_runs_each_epoch(train_run):
    results, out = train_run(_toy("PhasedToy"))
    metrics = read_metrics(out)
    epochs = metrics[metrics["phase"].notna()]
    assert epochs["phase"].tolist() == ["warm", "main"]
    assert epochs["lr"].tolist() == pytest.approx([0.05, 0.01])  # each phase's optimizer, from its groups
    assert CALLS["epoch_start"] == [0, 1]
    assert results["status"] == "ok"


def test_resume_across_a_phase_change_equals_the_uninterrupted_run(train_run, tmp_path):
    common = [_toy("PhasedToy"), "trainer.checkpoint_every_n_steps=3", "trainer.keep_checkpoints=10"]
    _, full = train_run(*common, name="full")
    for step in (3, 4, 6):  # mid-epoch 0 (warm), epoch end, mid-epoch 1 (main, a rebuilt optimizer)
        part = tmp_path / f"part{step}"
        (part / "checkpoints").mkdir(parents=True)
        shutil.copy(ckpt.path_for(full, step), part / "checkpoints")
        CALLS.clear()
        _, resumed = train_run(*common, "trainer.resume=auto", name=f"part{step}")
        pd.testing.assert_frame_equal(
            read_metrics(full).drop(columns=["time/epoch_s"]),
            read_metrics(resumed).drop(columns=["time/epoch_s"]),
            check_exact=True,
        )
        # epoch_start does not run again for the epoch a mid-epoch checkpoint was taken in
        assert CALLS.get("epoch_start", []) == {3: [1], 4: [1], 6: []}[step]


def test_train_indices_resample_the_training_set_and_resume_exactly(train_run, tmp_path):
    common = [_toy("HalfTheSamples"), "trainer.checkpoint_every_n_steps=2", "trainer.keep_checkpoints=10"]
    _, full = train_run(*common, name="full")
    seen = CALLS["indices"]
    assert set(seen) == set(range(0, 64, 2)) and len(seen) == 2 * 34  # 34 samples an epoch, 2 epochs
    assert seen.count(0) == seen.count(2) == 4 and seen.count(4) == 2
    part = tmp_path / "part"  # 3 steps an epoch: global step 4 is in the middle of epoch 1
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt.path_for(full, 4), part / "checkpoints")
    shutil.copy(full / "steps.csv", part)  # the resumed run cuts it back to the checkpoint's steps
    _, resumed = train_run(*common, "trainer.resume=auto", name="part")
    pd.testing.assert_frame_equal(pd.read_csv(full / "steps.csv"), pd.read_csv(resumed / "steps.csv"), check_exact=True)


def test_a_step_strategy_replaces_the_step(train_run):
    results, out = train_run(_toy("SubStepToy"), "trainer.epochs=1")
    steps = pd.read_csv(out / "steps.csv")
    assert len(CALLS["substeps"]) == 4 and "train/first_loss" in steps.columns
    assert steps["train/first_loss"].notna().all() and results["status"] == "ok"


def test_tagged_train_indices_read_their_sample_and_epoch_end_scalars_join_the_epoch_row(train_run):
    _, out = train_run(_toy("TaggedCopies"))
    seen = dict(CALLS["seen"])  # index -> label, as the step saw them
    assert sorted(seen) == [*range(64), 69, 133]
    assert seen[69] == seen[133] == seen[5]
    assert CALLS["sizes"] == {(5, 64)}  # 66 samples in batches of 16: 5 steps; the split holds 64
    epochs = read_metrics(out)
    assert epochs["train/twice_epoch"].tolist()[:2] == [0.0, 2.0]


def test_the_hooks_read_train_in_order_with_indices_and_val(train_run):
    train_run(_toy("LoaderProbe"), "trainer.epochs=1")
    assert CALLS["train_eval"] == list(range(64)) and CALLS["val_batches"] == 1


def test_default_param_groups_exempt_what_a_module_names_from_weight_decay():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(3))
            self.lin = nn.Linear(3, 3)

        def no_weight_decay(self):
            return [self.alpha]

    frozen = nn.Linear(2, 2).requires_grad_(False)
    mixer = Mixer()
    groups = default_param_groups([mixer, None, frozen])
    assert [len(g["params"]) for g in groups] == [2, 1]
    assert groups[1]["params"][0] is mixer.alpha and groups[1]["weight_decay"] == 0.0


def test_prerequisite_runs_train_first_are_reused_and_leave_the_main_run_as_built_alone(train_run):
    results, out = train_run(_toy("PrerequisiteToy"), name="toy")
    (runs,) = CALLS["prerequisites"]
    warm = out / "prerequisites" / "warm"
    assert runs == {"warm": warm} and results["status"] == "ok"
    warm_results = read_results(warm)
    assert warm_results["status"] == "ok" and warm_results["modalities"] == ["audio"]
    assert len(read_metrics(warm)) == 2  # one epoch + the test row: the run's changes were applied
    assert CALLS["num_batches"] == {"train": 4, "train_eval": 2, "val": 1}  # 64 train clips in 16s, 32s; 32 val
    # the main run equals the same method without a prerequisite: the prerequisite's RNG draws were put back
    _, plain = train_run(_toy("RandomDrop"), name="plain")
    pd.testing.assert_frame_equal(
        read_metrics(out).drop(columns=["time/epoch_s"]),
        read_metrics(plain).drop(columns=["time/epoch_s"]),
        check_exact=True,
    )
    # a finished prerequisite is reused, not trained again
    stamp = (warm / "results.json").stat().st_mtime_ns
    CALLS.clear()
    train_run(_toy("PrerequisiteToy"), "trainer.resume=never", name="toy")
    assert (warm / "results.json").stat().st_mtime_ns == stamp and CALLS["prerequisites"] == [{"warm": warm}]
