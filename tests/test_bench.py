"""`make bench` code paths on a tiny model and tiny shapes (no timing is asserted: the figures are measurements,
printed by the bench itself)."""
from __future__ import annotations

import queue

import pytest
import torch

from onthefly import bench


@pytest.fixture
def tiny_bench(monkeypatch):
    monkeypatch.setattr(bench, "BACKBONE", "resnet18_small")
    monkeypatch.setattr(bench, "SHAPES", {
        "CREMA-D": ((1, 32, 24), 1, 32, 4, "cvpr2022"),
        "VGGSound": ((1, 16, 40), 3, 24, 4, "cvpr2022"),
    })
    torch.set_num_threads(1)


def test_step_overhead_times_every_method_against_the_bare_step(tiny_bench):
    a = bench.step_overhead(torch.device("cpu"), batch=4, repeats=2, warmup=1, precision="32")
    assert list(a["ratio"]) == ["bare", "none (ρ measured)", *bench.METHODS]
    assert a["ratio"]["bare"] == 1.0
    assert all(t > 0 for t in a["median_s"].values())
    assert all(lo <= a["median_s"][n] <= hi for n, (lo, hi) in a["range_s"].items())


def test_bare_trainer_skips_the_unimodal_estimate(tiny_bench):
    trainer = bench._trainer("none", torch.device("cpu"), bare=True)
    inputs, labels = bench._batch((1, 32, 24), 1, 32, 4, torch.device("cpu"))
    ctx = trainer._ctx(0, 0)
    trainer.train_step(ctx, inputs, labels)
    assert ctx.rho is None and "rho_audio" not in ctx.metrics
    measured = bench._trainer("none", torch.device("cpu"))
    ctx = measured._ctx(0, 0)
    measured.train_step(ctx, inputs, labels)
    assert ctx.rho is not None


def test_cremad_like_clips_have_the_cremad_shapes():
    data = bench.CremadLike(3)
    item = data[2]
    assert item["audio"].shape == (1, 257, 188) and item["visual"].shape == (1, 3, 224, 224)
    assert item["visual"].dtype == torch.float32 and torch.isfinite(item["audio"]).all()


def test_shape_worker_reports_throughput_and_peak_memory(tiny_bench):
    q: queue.Queue = queue.Queue()
    bench._shape_worker("VGGSound", "cpu", 1, False, q)
    row = q.get_nowait()
    assert "error" not in row, row
    assert row["batch"] == 4 and row["frames"] == "3x24" and row["samples_s"] > 0 and row["peak_gib"] > 0


def test_ddp_scaling_says_why_it_is_skipped_with_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert bench.ddp_scaling(steps=1) == {"skipped": "needs two or more CUDA GPUs; this machine has 1"}
