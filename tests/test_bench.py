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
    monkeypatch.setattr(
        bench,
        "SHAPES",
        {
            "CREMA-D": ((1, 32, 24), 1, 32, 4, "cvpr2022"),
            "VGGSound": ((1, 16, 40), 3, 24, 4, "cvpr2022"),
        },
    )
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


TINY_SOURCES = {"cremad": (1.0, (64, 48), 10), "kinetics": (2.0, (64, 48), 10)}


@pytest.fixture(scope="module")
def reader_figures(tmp_path_factory):
    """(b) on tiny generated clips: real caches made by the prep, read as training reads them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "SOURCES", TINY_SOURCES)
        torch.set_num_threads(1)
        return bench.reader_throughput(
            tmp_path_factory.mktemp("bench_b"), items=6, batches=2, workers=0, clips=10, sources=2, prep_workers=1
        )


def test_reader_bench_times_every_recipes_cache_reader_and_the_decoding_baseline(reader_figures):
    rows = reader_figures["rows"]
    assert [r["dataset"] for r in rows] == ["CREMA-D", "CREMA-D", "CREMA-D", "Kinetics-Sounds", "VGGSound"]
    assert [r["kind"] for r in rows] == ["cache", "decode", "decode", "cache", "cache"]
    for r in rows:
        assert r["ms_per_sample"] > 0 and r["cpu_ms_per_sample"] > 0 and r["samples_s"] > 0, r
        assert r["batch"] >= 1
    for r in (rows[0], rows[3], rows[4]):
        assert 0 < r["audio_cpu_ms"] < r["cpu_ms_per_sample"], r  # the audio read is a part of the item
    assert reader_figures["goal_met"] == (rows[0]["cpu_ms_per_sample"] <= bench.GOAL_MS)
    text = bench.print_readers(reader_figures)
    assert "CREMA-D cache, ogm_ge, 1 frame 224" in text and "decode in __getitem__" in text
    assert "VGGSound cache, ogm_ge, 3 frames 224, 626-frame audio crop" in text


def test_the_bench_reads_the_caches_with_the_protocol_presets(tmp_path):
    """What the reader bench times is what training reads: the preset's shapes out of the prep's caches."""
    from data_prep.bench import build_cache, generate_clips
    from onthefly.engine.build import build_splits

    sources = generate_clips(tmp_path / "src", "cremad", 0, TINY_SOURCES)
    root = build_cache(tmp_path / "cremad", "cremad", "ogm_ge", sources, clips=9)
    splits = build_splits(bench._reader_cfg("cvpr2022/cremad", root))
    train = splits.train
    assert len(train) + len(splits.val) == 8 and len(splits.test) == 1  # every 8th clip is in test
    item = train[0]
    assert item["audio"].shape == (1, 257, 188) and item["visual"].shape == (1, 3, 224, 224)
    base = bench.DecodeInGetitem(bench.DecodeInGetitem.make_tree(tmp_path / "raw", sources, 3))
    for video in (False, True):
        base.video = video
        other = base[1]
        assert other["audio"].shape == item["audio"].shape and other["visual"].shape == item["visual"].shape
        assert torch.isfinite(other["audio"]).all() and torch.isfinite(other["visual"]).all()


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
