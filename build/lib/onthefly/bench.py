"""`python -m onthefly.bench` (`make bench`): performance figures, measured in one run on this machine.

(a) train-step time of each method / the bare step (same model, same batch, interleaved repeats, median);
(b) input-pipeline samples/s / model samples/s on CREMA-D-shaped synthetic clips (JPEG frames decoded and
    cropped in the loader's workers, the spectrogram computed from a waveform);
(c) samples/s and peak memory at the CREMA-D, Kinetics-Sounds and VGGSound input shapes, protocol batch sizes,
    full-width ResNet18 (each shape in a fresh process, so the peaks do not mix);
(d) DDP scaling efficiency over the visible GPUs (needs two or more).

"Bare" step: joint training with no method (modulation=none) AND without the per-step uni-modal estimate, i.e.
forward, cross-entropy, backward, optimizer step. Every method is timed through the same training loop
(`Trainer.train_step`), so each ratio is the full cost of that method: ρ (uni-modal logits + scores) plus its
own hooks. On a CPU the step uses a smaller batch and every part takes fewer steps (`--quick` on CPU by default):
the figures are then CPU figures, printed as such.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

METHODS = ("ogm", "ogm_ge", "opm", "opm_ogm")
# name -> (audio [C, F, T], frames, frame size, batch size, protocol)
SHAPES = {
    "CREMA-D": ((1, 257, 188), 1, 224, 64, "cvpr2022"),
    "Kinetics-Sounds": ((1, 1024, 128), 3, 112, 32, "tpami2024"),
    "VGGSound": ((1, 129, 626), 3, 224, 64, "cvpr2022"),
}
BACKBONE = "resnet18"  # the papers' full-width encoder (tests swap in resnet18_small)
CREMAD_SR, CREMAD_SECONDS, CREMAD_FFT, CREMAD_HOP = 22050, 3.0, 512, 353  # -> 257 x 188


# --- the model and a training step --------------------------------------------------------------------------
def _trainer(method: str, device: torch.device, bare: bool = False, precision: str = "32"):
    """A Trainer for the full-width ResNet18 (CVPR protocol: SGD), built as `train` builds it."""
    from onthefly.config import compose
    from onthefly.engine.build import build
    from onthefly.engine.trainer import Trainer
    from onthefly.logging import RunLogger

    cfg = compose([f"modulation={method}", f"backbone={BACKBONE}", "optim=sgd", "dataset.num_classes=6",
                   "dataset.num_train=8", "dataset.num_val=8", "dataset.num_test=8", f"trainer.device={device}",
                   f"trainer.precision={precision}", "trainer.deterministic=false", "trainer.progress=false",
                   "trainer.num_workers=0", "logger.mode=disabled"])
    parts = build(cfg, device)
    logger = RunLogger(Path("."), {}, {"mode": "disabled"}, enabled=False)
    trainer = Trainer.from_parts(cfg, parts, logger, device)
    if bare:
        trainer.use_rho = False  # no uni-modal logits, no scores, no ρ
    parts.model.train()
    return trainer


def _batch(audio_shape, frames: int, size: int, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    inputs = {"audio": torch.randn(batch, *audio_shape, generator=g),
              "visual": torch.randn(batch, frames, 3, size, size, generator=g)}
    labels = torch.randint(0, 6, (batch,), generator=g)
    return {m: x.to(device) for m, x in inputs.items()}, labels.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(trainer, inputs, labels) -> float:
    _sync(trainer.device)
    t = time.perf_counter()
    trainer.train_step(trainer._ctx(0, 0), inputs, labels)
    _sync(trainer.device)
    return time.perf_counter() - t


def step_overhead(device: torch.device, batch: int, repeats: int, warmup: int, precision: str) -> dict:
    """(a) median step time per method and its ratio to the bare step; methods interleaved every repeat so that
    a change in the machine's load hits all of them alike."""
    audio, frames, size = SHAPES["CREMA-D"][0], SHAPES["CREMA-D"][1], SHAPES["CREMA-D"][2]
    inputs, labels = _batch(audio, frames, size, batch, device)
    variants = {"bare": _trainer("none", device, bare=True, precision=precision),
                "none (ρ measured)": _trainer("none", device, precision=precision)}
    variants.update({m: _trainer(m, device, precision=precision) for m in METHODS})
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = np.random.default_rng(0)
    for i in range(warmup + repeats):
        rng.shuffle(order)  # a new order every round: no variant always follows the same one
        for name in order:
            t = _timed_step(variants[name], inputs, labels)
            if i >= warmup:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    spread = {name: (min(ts), max(ts)) for name, ts in times.items()}
    return {"batch": batch, "repeats": repeats, "median_s": med, "range_s": spread,
            "ratio": {n: med[n] / med["bare"] for n in med}}


# --- (b) the input pipeline ---------------------------------------------------------------------------------
class CremadLike(torch.utils.data.Dataset):
    """CREMA-D-shaped clips made in memory: a 3 s waveform (log-spectrogram 257 x 188 computed per item) and
    frames stored as JPEG bytes, decoded and cropped to 224 per item (the training transform)."""

    def __init__(self, n: int, frames: int = 1, height: int = 256, width: int = 341):
        from PIL import Image

        from onthefly.data.transforms import frame_transform

        g = torch.Generator().manual_seed(0)
        self.n, self.frames = n, frames
        self.waves = [torch.randn(int(CREMAD_SR * CREMAD_SECONDS), generator=g) * 0.1 for _ in range(min(n, 16))]
        self.jpegs = []
        for _ in range(min(n, 16)):
            clip = []
            for _ in range(frames):
                # smooth content (a blurred noise field) compresses like a real frame, unlike white noise
                small = torch.rand(3, height // 8, width // 8, generator=g)
                img = torch.nn.functional.interpolate(small[None], size=(height, width), mode="bilinear")[0]
                buf = io.BytesIO()
                Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(buf, format="JPEG", quality=90)
                clip.append(buf.getvalue())
            self.jpegs.append(clip)
        self.tf = frame_transform(True, 224, (0.08, 1.0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        from onthefly.data.audio import log_spectrogram

        k = i % len(self.waves)
        spec = log_spectrogram(self.waves[k], CREMAD_FFT, CREMAD_HOP).unsqueeze(0)
        frames = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                              for b in self.jpegs[k]])
        return {"audio": spec, "visual": self.tf(frames), "label": i % 6, "index": i}


def pipeline_ratio(device: torch.device, batch: int, workers: int, batches: int, model_steps: int) -> dict:
    """(b) loader samples/s (workers decoding, nothing else running) / training samples/s at the same batch."""
    loader = torch.utils.data.DataLoader(CremadLike(batch * (batches + 2)), batch_size=batch, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    first = next(it)  # workers started, first batch ready
    assert first["audio"].shape[1:] == (1, 257, 188) and first["visual"].shape[1:] == (1, 3, 224, 224)
    t = time.perf_counter()
    n = 0
    for b in it:
        n += len(b["label"])
        b["audio"].to(device, non_blocking=True), b["visual"].to(device, non_blocking=True)
    _sync(device)
    data_rate = n / (time.perf_counter() - t)
    trainer = _trainer("ogm_ge", device)
    inputs, labels = _batch((1, 257, 188), 1, 224, batch, device)
    _timed_step(trainer, inputs, labels)
    step = statistics.median(_timed_step(trainer, inputs, labels) for _ in range(model_steps))
    model_rate = batch / step
    return {"batch": batch, "workers": workers, "pipeline_samples_s": data_rate, "model_samples_s": model_rate,
            "ratio": data_rate / model_rate}


# --- (c) shapes at protocol batch sizes, one process each ----------------------------------------------------
def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _shape_worker(name: str, device_name: str, steps: int, warmup: bool, queue) -> None:
    try:
        device = torch.device(device_name)
        audio, frames, size, batch, protocol = SHAPES[name]
        trainer = _trainer("ogm_ge", device)
        inputs, labels = _batch(audio, frames, size, batch, device)
        before = _rss_kb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if warmup:
            _timed_step(trainer, inputs, labels)  # allocations, cuDNN autotuning
        step = statistics.median(_timed_step(trainer, inputs, labels) for _ in range(steps))
        peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        queue.put({"dataset": name, "protocol": protocol, "batch": batch, "audio": "x".join(map(str, audio[1:])),
                   "frames": f"{frames}x{size}", "samples_s": batch / step, "step_s": step, "peak_gib": peak,
                   "memory": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
                   "rss_before_gib": before / 2**20})
    except Exception as err:  # noqa: BLE001  (reported in the table, the other shapes still run)
        queue.put({"dataset": name, "error": f"{type(err).__name__}: {err}"})


def shape_throughput(device: torch.device, steps: int, warmup: bool) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for name in SHAPES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_shape_worker, args=(name, str(device), steps, warmup, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    return rows


# --- (d) DDP scaling ---------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, per_gpu: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from onthefly.config import compose
    from onthefly.engine import distributed as ddp
    from onthefly.engine.build import build
    from onthefly.engine.trainer import Trainer
    from onthefly.logging import RunLogger

    info, device = ddp.setup("cuda")
    try:
        cfg = compose(["modulation=ogm_ge", "backbone=resnet18", "dataset.num_classes=6", "dataset.num_train=64",
                       "dataset.num_val=8", "dataset.num_test=8", f"trainer.batch_size={per_gpu * world}",
                       "trainer.deterministic=false", "logger.mode=disabled"])
        parts = build(cfg, device, info)
        logger = RunLogger(Path("."), {}, {"mode": "disabled"}, enabled=False)
        trainer = Trainer.from_parts(cfg, parts, logger, device, dist=info)
        audio, frames, size = SHAPES["CREMA-D"][:3]
        inputs, labels = _batch(audio, frames, size, per_gpu, device)
        _timed_step(trainer, inputs, labels)
        ddp.barrier(info)
        t = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(trainer._ctx(0, 0), inputs, labels)
        _sync(device)
        ddp.barrier(info)
        if rank == 0:
            queue.put(per_gpu * world * steps / (time.perf_counter() - t))
    finally:
        ddp.teardown(info)


def ddp_scaling(steps: int, per_gpu: int = 64) -> dict:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return {"skipped": f"needs two or more CUDA GPUs; this machine has {gpus}"}
    import socket

    ctx = mp.get_context("spawn")
    rates = {}
    for world in (1, gpus):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, per_gpu, steps, queue)) for r in range(world)]
        for p in procs:
            p.start()
        rates[world] = queue.get()
        for p in procs:
            p.join()
    return {"gpus": gpus, "per_gpu_batch": per_gpu, "samples_s": rates,
            "efficiency": rates[gpus] / (gpus * rates[1])}


# --- report -------------------------------------------------------------------------------------------------
def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)} (x{torch.cuda.device_count()}), torch {torch.__version__}"
    return f"CPU only: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="fewer steps and a smaller (a)/(b) batch; default: on for CPU, off for CUDA")
    p.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"], help="precision of the (a) steps")
    p.add_argument("--workers", type=int, default=None, help="loader workers for (b); default: min(cores, 16)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from onthefly.engine.distributed import select_device

    device = select_device(args.device)
    quick = args.quick if args.quick is not None else device.type == "cpu"
    workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 16)
    step_batch = 4 if quick else 64  # (a)
    pipe_batch = 8 if quick else 64  # (b)
    t0 = time.time()
    print(f"onthefly bench on {_machine(device)}; {'quick (CPU) settings' if quick else 'full settings'}", flush=True)
    figures: dict = {"machine": _machine(device), "quick": quick}

    a = step_overhead(device, step_batch, repeats=6 if quick else 30, warmup=1 if quick else 5, precision=args.precision)
    figures["a_step_overhead"] = a
    print(f"\n(a) train-step time / bare step  [full ResNet18, CREMA-D shapes, batch {a['batch']}, "
          f"median of {a['repeats']} repeats, methods interleaved in a new order each round, precision "
          f"{args.precision}]")
    print("    bare = modulation=none without the per-step uni-modal estimate (forward, loss, backward, SGD step)")
    for name, ratio in a["ratio"].items():
        lo, hi = a["range_s"][name]
        print(f"    {name:<20} {a['median_s'][name] * 1000:9.1f} ms  (range {lo * 1000:.0f}-{hi * 1000:.0f})   "
              f"ratio {ratio:.3f}")

    b = pipeline_ratio(device, pipe_batch, workers, batches=6 if quick else 30, model_steps=1 if quick else 10)
    figures["b_pipeline"] = b
    print(f"\n(b) input pipeline / model  [CREMA-D-shaped clips: 3 s waveform -> 257x188 log-spectrogram, 1 JPEG "
          f"frame -> random crop 224; batch {b['batch']}, {b['workers']} workers]")
    print(f"    pipeline {b['pipeline_samples_s']:.1f} samples/s, model (OGM-GE step) {b['model_samples_s']:.1f} "
          f"samples/s, ratio {b['ratio']:.2f}")

    c = shape_throughput(device, steps=1 if quick else 10, warmup=not quick)
    figures["c_shapes"] = c
    timing = "1 step, no warm-up" if quick else "median of 10 steps after a warm-up"
    print(f"\n(c) protocol shapes, full ResNet18, OGM-GE step  [{timing}, each shape in a fresh process]")
    for row in c:
        if "error" in row:
            print(f"    {row['dataset']:<16} failed: {row['error']}")
            continue
        print(f"    {row['dataset']:<16} {row['protocol']:<10} batch {row['batch']:>3}  audio {row['audio']:<9} "
              f"frames {row['frames']:<6} {row['samples_s']:8.1f} samples/s  peak {row['peak_gib']:.2f} GiB "
              f"({row['memory']})")

    d = ddp_scaling(steps=3 if quick else 20)
    figures["d_ddp"] = d
    if "skipped" in d:
        print(f"\n(d) DDP scaling: skipped ({d['skipped']})")
    else:
        print(f"\n(d) DDP scaling over {d['gpus']} GPUs (batch {d['per_gpu_batch']} per GPU): "
              f"1 GPU {d['samples_s'][1]:.1f} samples/s, {d['gpus']} GPUs {d['samples_s'][d['gpus']]:.1f} samples/s, "
              f"efficiency {d['efficiency']:.3f}")
    figures["wall_s"] = time.time() - t0
    print(f"\nbench took {figures['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
