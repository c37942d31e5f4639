"""`python -m onthefly.bench` (`make bench`): performance figures, measured in one run on this machine.

(a) train-step time of each method / the bare step (same model, same batch, interleaved repeats, median);
(b) the input pipeline training uses: for each recipe (CREMA-D `ogm_ge`, Kinetics-Sounds `fbank`, VGGSound), the
    cache reader on a cache that the prep builds from generated clips of realistic size, with its protocol
    preset's frames, image size and crops, in ms per sample on one core (one loader worker) and in samples/s
    through the training loader; beside it, for CREMA-D, a loader that decodes media in `__getitem__` (WAV +
    JPEG files, or the frame decoded from the FLV with PyAV); and the CREMA-D loader's samples/s over the
    model's;
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
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
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

    cfg = compose(
        [
            f"modulation={method}",
            f"backbone={BACKBONE}",
            "optim=sgd",
            "dataset.num_classes=6",
            "dataset.num_train=8",
            "dataset.num_val=8",
            "dataset.num_test=8",
            f"trainer.device={device}",
            f"trainer.precision={precision}",
            "trainer.deterministic=false",
            "trainer.progress=false",
            "trainer.num_workers=0",
            "logger.mode=disabled",
        ]
    )
    parts = build(cfg, device)
    logger = RunLogger(Path("."), {}, {"mode": "disabled"}, enabled=False)
    trainer = Trainer.from_parts(cfg, parts, logger, device)
    if bare:
        trainer.use_rho = False  # no uni-modal logits, no scores, no ρ
    parts.model.train()
    return trainer


def _batch(audio_shape, frames: int, size: int, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    inputs = {
        "audio": torch.randn(batch, *audio_shape, generator=g),
        "visual": torch.randn(batch, frames, 3, size, size, generator=g),
    }
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
    variants = {
        "bare": _trainer("none", device, bare=True, precision=precision),
        "none (ρ measured)": _trainer("none", device, precision=precision),
    }
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
    return {
        "batch": batch,
        "repeats": repeats,
        "median_s": med,
        "range_s": spread,
        "ratio": {n: med[n] / med["bare"] for n in med},
    }


# --- (b) the input pipeline -----------------------------------------------------------------------------------
# label -> (dataset, the protocol preset whose dataset options training uses)
READERS = {
    "CREMA-D": ("cremad", "cvpr2022/cremad"),
    "Kinetics-Sounds": ("kinetics_sounds", "tpami2024/kinetics_sounds"),
    "VGGSound": ("vggsound", "cvpr2022/vggsound"),
}
GOAL_MS = 1.0  # ms per sample per core for the CREMA-D reader (issue 13)
# generated source clips per kind: (seconds, (width, height), fps); None: data_prep.bench.REALISTIC
SOURCES: Optional[dict] = None


def _reader_cfg(preset: str, root: Path, batch: Optional[int] = None):
    from onthefly.config import compose

    overrides = [f"experiment={preset}", f"dataset.root={root}", "logger.mode=disabled"]
    return compose(overrides + ([f"trainer.batch_size={batch}"] if batch else []))


def make_caches(workdir: Path, clips: int, sources: int, workers: int) -> dict[str, Path]:
    """One real cache per reader of :data:`READERS` under ``workdir``, made by the prep's code from generated
    clips of realistic size (``sources`` distinct clips, cycled into ``clips`` cache entries); the CREMA-D
    sources also as a raw tree for :class:`DecodeInGetitem` (``<workdir>/raw_cremad``)."""
    from data_prep.bench import build_cache, generate_clips

    made = {
        "cremad": generate_clips(workdir / "sources", "cremad", sources - 1, SOURCES),
        "kinetics": generate_clips(workdir / "sources", "kinetics", sources - 1, SOURCES),
    }
    caches = {}
    for label, (dataset, preset) in READERS.items():
        recipe = _reader_cfg(preset, workdir).dataset.audio_recipe
        kind = "cremad" if dataset == "cremad" else "kinetics"
        caches[label] = build_cache(workdir / dataset, dataset, recipe, made[kind], clips, workers=workers)
    caches["raw_cremad"] = DecodeInGetitem.make_tree(workdir / "raw_cremad", made["cremad"], clips)
    return caches


class DecodeInGetitem(torch.utils.data.Dataset):
    """A CREMA-D loader without a cache, built the way the released OGM-GE loader is: every item lists its
    clip's frame folder, reads the 16-kHz WAV (soundfile), resamples it to 22,050 Hz, tiles it to 3 s, clips it to
    [-1, 1] and takes the log-STFT (torch.stft, n_fft 512, hop 353: 257 x 188), opens one frame (a JPEG file
    extracted at the video's own size; with ``video=True`` the frame is decoded from the FLV with PyAV instead)
    and augments it (RandomResizedCrop 224, horizontal flip, to tensor, ImageNet normalisation: torchvision's
    transforms on the PIL image). Returns what :class:`~onthefly.data.clips.CachedClips` returns."""

    def __init__(self, root: Path, train: bool = True, video: bool = False):
        import torchvision.transforms as T

        from onthefly.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.root, self.train, self.video = Path(root), train, video
        self.ids = sorted(p.stem for p in (self.root / "AudioWAV").glob("*.wav"))
        resize = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train else [T.Resize((224, 224))]
        self.tf = T.Compose([*resize, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    @staticmethod
    def make_tree(root: Path, sources: list, clips: int) -> Path:
        """``AudioWAV/<id>.wav``, ``VideoFlash/<id>.flv`` and ``frames/<id>/<k>.jpg`` (1 fps, the video's size,
        JPEG quality 90) for ``clips`` ids cycling over the generated ``sources``."""
        import shutil

        from data_prep.media import decode_container, encode_frame

        root = Path(root)
        frames = {}
        for i in range(clips):
            src = sources[i % len(sources)].sources
            cid = f"{1001 + i}_IEO_ANG_XX"
            for sub, key, ext in (("AudioWAV", "audio", ".wav"), ("VideoFlash", "video", ".flv")):
                (root / sub).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src[key], root / sub / f"{cid}{ext}")
            if src["video"] not in frames:
                frames[src["video"]] = [
                    encode_frame(f, 90) for f in decode_container(Path(src["video"]), short_side=None).frames
                ]
            folder = root / "frames" / cid
            folder.mkdir(parents=True, exist_ok=True)
            for k, jpeg in enumerate(frames[src["video"]]):
                (folder / f"{k:05d}.jpg").write_bytes(jpeg)
        return root

    def __len__(self) -> int:
        return len(self.ids)

    def _frame(self, cid: str):
        import av
        from PIL import Image

        names = sorted(os.listdir(self.root / "frames" / cid))
        k = int(torch.randint(len(names), ())) if self.train else len(names) // 2
        if not self.video:
            return Image.open(self.root / "frames" / cid / names[k]).convert("RGB")
        with av.open(str(self.root / "VideoFlash" / f"{cid}.flv")) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            container.seek(int((k + 0.5) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time >= k + 0.5 - 1e-3:
                    return frame.to_image()
            return frame.to_image()

    def __getitem__(self, i: int) -> dict:
        import soundfile as sf
        import torchaudio.functional as AF

        from onthefly.data.audio import log_spectrogram, tile_to_length

        cid = self.ids[i]
        wave, rate = sf.read(str(self.root / "AudioWAV" / f"{cid}.wav"), dtype="float32")
        x = AF.resample(torch.from_numpy(wave), rate, CREMAD_SR)
        x = tile_to_length(x, int(CREMAD_SR * CREMAD_SECONDS)).clamp(-1, 1)
        spec = log_spectrogram(x, CREMAD_FFT, CREMAD_HOP).unsqueeze(0)
        visual = self.tf(self._frame(cid)).unsqueeze(0)
        return {"audio": spec, "visual": visual, "label": 0, "index": i}


def _per_sample(dataset, items: int) -> dict:
    """One process, one thread, as one loader worker: wall and CPU ms per item over ``items`` items (after a
    warm-up), items drawn as training draws them (``SampleSeeded``, epoch 1)."""
    from onthefly.data.loaders import SampleSeeded

    seeded, n = SampleSeeded(dataset, 0), len(dataset)
    for k in range(min(8, n)):
        seeded[(0, k)]
    wall, cpu = time.perf_counter(), time.process_time()
    for k in range(items):
        seeded[(1, k % n)]
    return {
        "ms_per_sample": 1000 * (time.perf_counter() - wall) / items,
        "cpu_ms_per_sample": 1000 * (time.process_time() - cpu) / items,
        "items": items,
    }


def _audio_ms(dataset, items: int) -> Optional[float]:
    """CPU ms per item of the audio part alone (a cache reader's spectrogram read and crop)."""
    if not hasattr(dataset, "_audio"):
        return None
    n = len(dataset)
    cpu = time.process_time()
    for k in range(items):
        dataset._audio(k % n)
    return 1000 * (time.process_time() - cpu) / items


def _loader_rate(dataset, batch: int, workers: int, batches: int) -> float:
    """Samples/s of the training loader (shuffled, per-sample seeded, ``workers`` processes) after its first
    batch, over ``batches`` batches (epochs repeat as needed)."""
    from onthefly.data.loaders import LoaderOptions, train_loader

    loader, sampler = train_loader(dataset, 0, batch, LoaderOptions(workers, 4 if workers else None))
    epoch, seen, n, t = 0, 0, 0, None
    while seen <= batches:
        sampler.set_epoch(epoch)
        for b in loader:
            if t is None:
                t = time.perf_counter()  # workers started, first batch ready
            else:
                n += len(b["label"])
            seen += 1
            if seen > batches:
                break
        epoch += 1
    return n / (time.perf_counter() - t)


def reader_throughput(
    workdir: Path, items: int, batches: int, workers: int, clips: int, sources: int, prep_workers: int
) -> dict:
    """(b) For each recipe: the cache reader training uses, on a cache the prep built from generated clips
    (its preset's frames, image size, crop and audio crop), in ms per sample on one core and in samples/s through
    the training loader with ``workers`` workers; for CREMA-D also :class:`DecodeInGetitem` (JPEG files, and
    frames decoded from the FLV)."""
    from onthefly.engine.build import build_splits

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    caches = make_caches(Path(workdir), clips, sources, prep_workers)
    rows = []
    for label, (dataset, preset) in READERS.items():
        cfg = _reader_cfg(preset, caches[label])
        train = build_splits(cfg).train
        ds = cfg.dataset
        what = f"cache, {ds.audio_recipe}, {ds.num_frames} frame{'s' if ds.num_frames > 1 else ''} {ds.image_size}" + (
            f", {ds.audio_crop}-frame audio crop" if ds.get("audio_crop") else ""
        )
        batch = min(int(cfg.trainer.batch_size), len(train))  # the preset's batch (tiny test caches: all of train)
        row = {
            "reader": f"{label} {what}",
            "dataset": label,
            "kind": "cache",
            "batch": batch,
            **_per_sample(train, items),
            "audio_cpu_ms": _audio_ms(train, items),
        }
        row["samples_s"] = _loader_rate(train, row["batch"], workers, batches)
        rows.append(row)
        if dataset == "cremad":
            for video in (False, True):
                base = DecodeInGetitem(caches["raw_cremad"], train=True, video=video)
                what = "WAV + frame from the FLV (PyAV)" if video else "WAV + JPEG frame files"
                row = {
                    "reader": f"CREMA-D decode in __getitem__ ({what})",
                    "dataset": label,
                    "kind": "decode",
                    "batch": rows[-1]["batch"],
                    **_per_sample(base, items),
                    "audio_cpu_ms": None,
                }
                row["samples_s"] = _loader_rate(base, row["batch"], workers, batches)
                rows.append(row)
    cache = rows[0]
    return {
        "workers": workers,
        "items": items,
        "clips": clips,
        "setup_s": time.perf_counter() - t0,
        "rows": rows,
        "goal_ms": GOAL_MS,
        "goal_met": cache["cpu_ms_per_sample"] <= GOAL_MS,
    }


def model_rate(device: torch.device, batch: int, steps: int) -> float:
    """Training samples/s of the OGM-GE step at CREMA-D shapes (what the loader has to keep up with)."""
    trainer = _trainer("ogm_ge", device)
    inputs, labels = _batch((1, 257, 188), 1, 224, batch, device)
    _timed_step(trainer, inputs, labels)
    return batch / statistics.median(_timed_step(trainer, inputs, labels) for _ in range(steps))


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
        peak = (
            torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        queue.put(
            {
                "dataset": name,
                "protocol": protocol,
                "batch": batch,
                "audio": "x".join(map(str, audio[1:])),
                "frames": f"{frames}x{size}",
                "samples_s": batch / step,
                "step_s": step,
                "peak_gib": peak,
                "memory": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
                "rss_before_gib": before / 2**20,
            }
        )
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
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from onthefly.config import compose
    from onthefly.engine import distributed as ddp
    from onthefly.engine.build import build
    from onthefly.engine.trainer import Trainer
    from onthefly.logging import RunLogger

    info, device = ddp.setup("cuda")
    try:
        cfg = compose(
            [
                "modulation=ogm_ge",
                "backbone=resnet18",
                "dataset.num_classes=6",
                "dataset.num_train=64",
                "dataset.num_val=8",
                "dataset.num_test=8",
                f"trainer.batch_size={per_gpu * world}",
                "trainer.deterministic=false",
                "logger.mode=disabled",
            ]
        )
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
    return {"gpus": gpus, "per_gpu_batch": per_gpu, "samples_s": rates, "efficiency": rates[gpus] / (gpus * rates[1])}


# --- report -------------------------------------------------------------------------------------------------
def print_readers(b: dict) -> str:
    """The (b) figures as aligned text."""
    width = max(len(r["reader"]) for r in b["rows"])
    lines = [
        f"    {'reader':<{width}}  {'ms/sample':>9}  {'CPU ms':>7}  {'of which audio':>14}  {'samples/s':>9}  batch"
    ]
    for r in b["rows"]:
        audio = f"{r['audio_cpu_ms']:.2f}" if r.get("audio_cpu_ms") is not None else "-"
        lines.append(
            f"    {r['reader']:<{width}}  {r['ms_per_sample']:>9.2f}  {r['cpu_ms_per_sample']:>7.2f}  "
            f"{audio:>14}  {r['samples_s']:>9.1f}  {r['batch']:>5}"
        )
    return "\n".join(lines)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)} (x{torch.cuda.device_count()}), torch {torch.__version__}"
    return f"CPU only: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--quick",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fewer steps and a smaller (a)/(b) batch; default: on for CPU, off for CUDA",
    )
    p.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"], help="precision of the (a) steps")
    p.add_argument("--workers", type=int, default=None, help="loader workers for (b); default: min(cores, 16)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    p.add_argument("--workdir", default=None, help="where (b) builds its temporary caches (default: the system's)")
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

    a = step_overhead(
        device, step_batch, repeats=6 if quick else 30, warmup=1 if quick else 5, precision=args.precision
    )
    figures["a_step_overhead"] = a
    print(
        f"\n(a) train-step time / bare step  [full ResNet18, CREMA-D shapes, batch {a['batch']}, "
        f"median of {a['repeats']} repeats, methods interleaved in a new order each round, precision "
        f"{args.precision}]"
    )
    print("    bare = modulation=none without the per-step uni-modal estimate (forward, loss, backward, SGD step)")
    for name, ratio in a["ratio"].items():
        lo, hi = a["range_s"][name]
        print(
            f"    {name:<20} {a['median_s'][name] * 1000:9.1f} ms  (range {lo * 1000:.0f}-{hi * 1000:.0f})   "
            f"ratio {ratio:.3f}"
        )

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        b = reader_throughput(
            Path(tmp),
            items=150 if quick else 600,
            batches=6 if quick else 30,
            workers=workers,
            clips=80 if quick else 256,
            sources=4,
            prep_workers=workers,
        )
    b["model_batch"] = pipe_batch
    b["model_samples_s"] = model_rate(device, pipe_batch, steps=1 if quick else 10)
    b["ratio"] = b["rows"][0]["samples_s"] / b["model_samples_s"]
    figures["b_pipeline"] = b
    print(
        f"\n(b) input pipeline: the cache reader training uses (frames decoded and cropped as in training) beside "
        f"a loader that decodes media in __getitem__  [a cache of {b['clips']} clips per recipe, made by the prep "
        f"from generated clips of realistic size; one process with one thread = one loader worker, "
        f"{b['items']} items; loader: the training loader with {b['workers']} workers, the preset's batch]"
    )
    print(print_readers(b))
    verdict = "met" if b["goal_met"] else "NOT met"
    print(
        f"    goal: CREMA-D cache reader <= {b['goal_ms']:g} ms per sample per core (CPU time): {verdict} "
        f"({b['rows'][0]['cpu_ms_per_sample']:.2f} ms)"
    )
    print(
        f"    model (OGM-GE step, batch {pipe_batch}): {b['model_samples_s']:.1f} samples/s; CREMA-D loader / model "
        f"= {b['ratio']:.1f}"
    )

    c = shape_throughput(device, steps=1 if quick else 10, warmup=not quick)
    figures["c_shapes"] = c
    timing = "1 step, no warm-up" if quick else "median of 10 steps after a warm-up"
    print(f"\n(c) protocol shapes, full ResNet18, OGM-GE step  [{timing}, each shape in a fresh process]")
    for row in c:
        if "error" in row:
            print(f"    {row['dataset']:<16} failed: {row['error']}")
            continue
        print(
            f"    {row['dataset']:<16} {row['protocol']:<10} batch {row['batch']:>3}  audio {row['audio']:<9} "
            f"frames {row['frames']:<6} {row['samples_s']:8.1f} samples/s  peak {row['peak_gib']:.2f} GiB "
            f"({row['memory']})"
        )

    d = ddp_scaling(steps=3 if quick else 20)
    figures["d_ddp"] = d
    if "skipped" in d:
        print(f"\n(d) DDP scaling: skipped ({d['skipped']})")
    else:
        print(
            f"\n(d) DDP scaling over {d['gpus']} GPUs (batch {d['per_gpu_batch']} per GPU): "
            f"1 GPU {d['samples_s'][1]:.1f} samples/s, {d['gpus']} GPUs {d['samples_s'][d['gpus']]:.1f} samples/s, "
            f"efficiency {d['efficiency']:.3f}"
        )
    figures["wall_s"] = time.time() - t0
    print(f"\nbench took {figures['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
