"""Data parallelism on CPU: gloo, 2 processes on 127.0.0.1.

One DDP step on a global batch equals one single-process step on that batch: the same scores, ρ, k and q on
every rank, and the same weights afterwards. BatchNorm layers are held in eval mode for this comparison: in
training mode each rank normalises with its own half of the batch (SyncBatchNorm, which fixes that, needs a
GPU), which would make the two runs differ for a reason that has nothing to do with the modulation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY, read_results, subprocess_env

GLOBAL_BATCH = 16
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(splits):
    """The first 16 training clips with the deterministic evaluation transforms, and their labels."""
    items = [splits.probe_train[i] for i in range(GLOBAL_BATCH)]
    inputs = {m: torch.stack([it[m] for it in items]) for m in ("audio", "visual")}
    return inputs, torch.tensor([it["label"] for it in items])


def _one_step(overrides: list[str], info, device, rank_slice: slice, record_masks=None, replay_masks=None) -> dict:
    """Build a run exactly as `train` does, take one training step on this rank's part of the global batch, and
    return what the step computed."""
    from onthefly.config import compose
    from onthefly.engine import build as builder
    from onthefly.engine.trainer import Trainer
    from onthefly.logging import RunLogger
    from onthefly.modulation import opm

    cfg = compose([*TINY, *overrides])
    parts = builder.build(cfg, device, info)
    logger = RunLogger(Path("."), {}, {"mode": "disabled"}, enabled=False)
    trainer = Trainer.from_parts(cfg, parts, logger, device, dist=info)
    parts.model.train()
    for module in parts.model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    inputs, labels = _global_batch(parts.splits)
    inputs = {m: x[rank_slice] for m, x in inputs.items()}
    labels = labels[rank_slice]

    real_drop = opm.drop_features
    if record_masks is not None:  # keep the masks each rank drew

        def recording(feats, q, mode, generator=None):
            out, keep = real_drop(feats, q, mode, generator)
            record_masks.append(keep.clone())
            return out, keep

        opm.drop_features = recording
    if replay_masks is not None:  # the single process uses the masks the ranks drew, stacked in rank order

        def replaying(feats, q, mode, generator=None):
            keep = replay_masks
            dims = torch.tensor([f.shape[1] for f in feats.values()], dtype=q.dtype)
            scale = opm.rescale_factors(q, dims, mode)
            out = {
                m: torch.where(keep[:, i, None], f * scale[i], torch.zeros_like(f))
                for i, (m, f) in enumerate(feats.items())
            }
            return out, keep

        opm.drop_features = replaying
    try:
        ctx = trainer._ctx(0, 0)
        values = trainer.train_step(ctx, inputs, labels)
    finally:
        opm.drop_features = real_drop
    return {
        "scores": ctx.scores.clone(),
        "rho": ctx.rho.clone(),
        "k": torch.stack([ctx.metrics[f"k_{m}"] for m in ("audio", "visual")]) if "k_audio" in ctx.metrics else None,
        "q": torch.stack([ctx.metrics[f"q_{m}"] for m in ("audio", "visual")]) if "q_audio" in ctx.metrics else None,
        "loss": values["loss"],
        "weights": {k: v.detach().clone() for k, v in parts.model.state_dict().items()},
    }


def _rank_main(rank: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    from onthefly.engine import distributed as ddp

    info, device = ddp.setup("cpu")
    try:
        local = GLOBAL_BATCH // WORLD
        masks: list = []
        result = _one_step(overrides, info, device, slice(rank * local, (rank + 1) * local), record_masks=masks)
        result["masks"] = masks
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        ddp.teardown(info)


CASES = {
    "ogm": ["modulation=ogm", "modulation.ge=false", "modulation.alpha=0.8"],
    "opm": ["modulation=opm", "modulation.p_exe=1.0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_one_ddp_step_equals_one_step_on_the_global_batch(case, tmp_path):
    overrides = CASES[case]
    mp.spawn(_rank_main, args=(_free_port(), overrides, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    from onthefly.engine.distributed import DistInfo

    replay = torch.cat([r["masks"][0] for r in ranks]) if case == "opm" else None
    single = _one_step(overrides, DistInfo(), torch.device("cpu"), slice(0, GLOBAL_BATCH), replay_masks=replay)

    for r, got in enumerate(ranks):
        # the scores are summed over ranks before ρ: every rank has the global numbers
        torch.testing.assert_close(got["scores"], single["scores"], rtol=1e-5, atol=1e-5, msg=f"scores on rank {r}")
        torch.testing.assert_close(got["rho"], single["rho"], rtol=1e-5, atol=1e-6, msg=f"rho on rank {r}")
        for key in ("k", "q"):
            if single[key] is not None:
                torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-6, msg=f"{key} on rank {r}")
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-6)
        for name, w in single["weights"].items():
            torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6, msg=f"{name} on rank {r}")
    # the replicas are identical to each other, bit for bit
    for name in single["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name

    # the comparison has teeth: the two halves differ, so a rank's own scores give another ρ, and the method acted
    assert not torch.allclose(ranks[0]["scores"], single["scores"] / 2, rtol=1e-3)
    if case == "ogm":
        assert (single["k"] < 1).any(), "OGM left every gradient alone; the test would not see a wrong order"
    else:
        assert (single["q"] > 0).any() and not replay.all(), "OPM dropped nothing; the masks are not tested"
        assert not torch.equal(ranks[0]["masks"][0], ranks[1]["masks"][0]), "both ranks drew the same masks"


def _torchrun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "onthefly.train",
        *TINY,
        *overrides,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_torchrun_two_process_training_run(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = _torchrun(
        tmp_path,
        "modulation=opm_ogm",
        "trainer.checkpoint_every_n_steps=3",
        "dataset.num_val=31",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    saved = read_results(run_dir)
    assert saved["status"] == "ok" and saved["world_size"] == WORLD and 0 <= saved["test"]["acc"] <= 1
    steps = pd.read_csv(run_dir / "steps.csv")
    # global batch 16 over 64 clips: 4 steps per epoch whatever the number of ranks
    assert list(steps["step"]) == list(range(1, 9))
    assert steps["train/k_audio"].between(0, 1).all() and steps["train/q_audio"].between(0, 1).all()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1, 2]
    # sharded evaluation gathers every clip once: val/acc is a multiple of 1/31 (31 val clips; the
    # second shard is padded with a duplicate, which must not count)
    assert (metrics["val/acc"].dropna() * 31).round(6).apply(float.is_integer).all()
    # rank 0 alone wrote: one results file, one checkpoint set
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == WORLD
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000000008.pt"]
    # the logged test numbers are best.pt's: every rank evaluated with rank 0's BatchNorm statistics (on CPU each
    # rank's own differ), so one process scoring best.pt on the whole test split finds the same numbers
    alone = _best_pt_on_test_in_one_process(run_dir)
    assert {k: alone[k] for k in ("acc", "acc_audio", "acc_visual")} == {
        k: saved["test"][k] for k in ("acc", "acc_audio", "acc_visual")
    }
    assert alone["loss"] == pytest.approx(saved["test"]["loss"], rel=1e-5)
    assert alone["map"] == pytest.approx(saved["test"]["map"], rel=1e-5)


def _best_pt_on_test_in_one_process(run_dir: Path) -> dict:
    from onthefly.data.loaders import make_loader
    from onthefly.engine.analysis import load_run
    from onthefly.engine.evaluation import evaluate
    from onthefly.tasks import build_task

    cfg, model, splits, device = load_run(run_dir, "cpu")
    loader = make_loader(splits["test"], cfg.trainer.eval_batch_size, False, 0, 0, device)
    return evaluate(model, loader, device, cfg.discrepancy.estimator, task=build_task(cfg, splits))


@pytest.mark.slow
def test_torchrun_resume_mid_epoch_matches_the_uninterrupted_ddp_run(tmp_path):
    """Every rank's RNG state and shard position come back: a 2-rank run resumed from its mid-epoch checkpoint
    ends with the uninterrupted 2-rank run's numbers."""
    import shutil

    from onthefly.engine import checkpoint as ckpt

    full = tmp_path / "full"
    common = ["modulation=opm_ogm", "trainer.checkpoint_every_n_steps=3"]
    proc = _torchrun(tmp_path, *common, "trainer.keep_checkpoints=10", f"hydra.run.dir={full}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    mid = ckpt.load(ckpt.path_for(full, 3))
    assert (mid["step_in_epoch"], mid["world_size"], len(mid["rng"])) == (3, WORLD, WORLD)

    part = tmp_path / "part"  # as a kill after step 3's checkpoint leaves it: the logs ran on (streamed)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt.path_for(full, 3), part / "checkpoints")
    for name in ("steps.csv", "metrics.csv"):
        shutil.copy(full / name, part / name)
    proc = _torchrun(tmp_path, *common, "trainer.resume=auto", f"hydra.run.dir={part}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for name in ("metrics.csv", "steps.csv"):
        a, b = pd.read_csv(full / name), pd.read_csv(part / name)
        a = a.drop(columns=[c for c in a.columns if c.startswith("time/")])
        b = b.drop(columns=[c for c in b.columns if c.startswith("time/")])
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert read_results(full)["test"] == read_results(part)["test"]
