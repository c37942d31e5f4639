"""``make bench-prep``: clips per second per process for each dataset's recipe, and cache bytes per clip.

    python -m data_prep.bench [clips=4] [workdir=/tmp/...]

Generates clips of realistic length and size (CREMA-D: 2.5-s 480 x 360 / 30-fps FLV + 16-kHz WAV;
Kinetics-Sounds and VGGSound: 10-s 340 x 256 / 25-fps MP4 with 44.1-kHz AAC), then times the prep's own
per-clip work (decode, resample, spectrogram, 1-fps frames, JPEG) on one core, after one warm-up clip.
Generation is not timed. Prints the figures and the projected wall time of the full CREMA-D on 16 processes
(assuming 16 free cores and a disk that keeps up). Also the load-time cost of VGGSound's two audio recipes
(the clean `ogm_ge`: a crop of the cached whole-clip spectrogram; the released `segment`: the STFT of a 5-s
segment of the cached waveform, fidelity=official): milliseconds per clip on one core, and cache bytes per clip.

:func:`build_cache` makes a real cache the same way (the prep's own writer over such clips) for `make bench`,
which times the reader that training uses on it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from data_prep.cache import Clip
from data_prep.pipeline import CommonOptions, cli, frame_recipe, parse_args, process_av, run_prep
from data_prep.synthetic import write_video, write_wav
from onthefly.data.cache import audio_recipe

FULL = {"cremad": 7442, "kinetics_sounds": 18716, "vggsound": 199176}


@dataclass
class Options:
    clips: int = 4
    workdir: Optional[str] = None
    processes: int = 16


# the generated sources: (seconds, (width, height), fps) per kind, as the real datasets ship them
REALISTIC = {"cremad": (2.5, (480, 360), 30), "kinetics": (10.0, (340, 256), 25)}


def generate_clips(root: Path, kind: str, n: int, spec: Optional[dict] = None) -> list[Clip]:
    """``n`` + 1 generated clips (the first one is a warm-up) of ``kind`` "cremad" (FLV + 16-kHz WAV) or
    "kinetics" (MP4 with AAC); ``spec`` overrides :data:`REALISTIC` (tests use tiny clips)."""
    seconds, size, fps = (spec or REALISTIC)[kind]
    out = []
    for i in range(n + 1):  # + a warm-up clip
        if kind == "cremad":
            video = write_video(
                root / "cremad" / f"{i}.flv",
                seconds,
                size=size,
                fps=fps,
                audio_rate=22050,
                noise=2.0,
                shift=i,
                seed=i,
                textured=True,
            )
            wav = write_wav(root / "cremad" / f"{i}.wav", seconds, freq=440.0, rate=16000)
            out.append(Clip(str(i), "ANG", "train", {"video": str(video), "audio": str(wav)}))
        else:
            video = write_video(
                root / "k" / f"{i}.mp4",
                seconds,
                size=size,
                fps=fps,
                audio_rate=44100,
                noise=2.0,
                shift=i,
                seed=i,
                textured=True,
            )
            out.append(Clip(str(i), "x", "train", {"video": str(video)}))
    return out


def build_cache(
    out: Path,
    dataset: str,
    recipe: str,
    sources: list[Clip],
    clips: int,
    classes: int = 6,
    workers: int = 1,
    test_every: int = 8,
) -> Path:
    """A cache of ``dataset`` with audio ``recipe`` at ``out``, made by the prep's own code (decode, recipe,
    1-fps frames as JPEG, the cache writer) from ``clips`` entries that cycle over the generated ``sources``
    (:func:`generate_clips`). Labels cycle over ``classes`` names; every ``test_every``-th clip is in test, the others
    in train. Quiet (the prep's summary is not printed). Returns ``out``."""
    import contextlib
    import io

    names = [f"class{k}" for k in range(classes)]
    entries = [
        Clip(
            f"{dataset}{i:05d}",
            names[i % classes],
            "test" if i % test_every == test_every - 1 else "train",
            dict(sources[i % len(sources)].sources),
            source=Path(sources[i % len(sources)].sources["video"]).name,
        )
        for i in range(clips)
    ]
    rec = audio_recipe(dataset, recipe)
    opts = CommonOptions(raw_root=str(out), workers=workers, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        run_prep(
            dataset=dataset,
            clips=entries,
            out_root=Path(out),
            recipe={"audio": rec, "frames": frame_recipe(opts), "min_audio_s": opts.min_audio_s},
            streams=["visual"],
            array={"shape": rec["shape"], "dtype": rec["dtype"]},
            classes=names,
            splits={"mode": "generated for the bench"},
            work=process_av,
            opts=opts,
            raw_root=Path(out),
            expected="generated clips",
        )
    return Path(out)


def measure(clips: list[Clip], dataset: str, recipe: str) -> dict:
    config = {"audio": audio_recipe(dataset, recipe), "short_side": 256, "jpeg_quality": 90, "min_audio_s": 0.1}
    process_av(clips[0], config)  # warm-up: first-call costs (FFT plans, codec set-up)
    sizes, frame_sizes, t0 = [], [], time.perf_counter()
    for clip in clips[1:]:
        result = process_av(clip, config)
        frame_sizes.append(sum(len(j) for j in result.jpegs))
        sizes.append(result.array.nbytes + frame_sizes[-1])
    seconds = time.perf_counter() - t0
    n = len(clips) - 1
    return {
        "dataset": dataset,
        "recipe": recipe,
        "clips_per_s": n / seconds,
        "ms_per_clip": 1000 * seconds / n,
        "bytes_per_clip": sum(sizes) / n,
        "frame_bytes_per_clip": sum(frame_sizes) / n,
        "frames": result.n_frames,
    }


def load_cost(clips: list[Clip], repeats: int = 50) -> list[dict]:
    """Load-time audio cost per clip of VGGSound's recipes on one core (the reader's own code paths)."""
    import numpy as np

    from onthefly.data.clips import waveform_segment_spectrogram
    from onthefly.data.sampling import crop_start

    rows = []
    for recipe in ("ogm_ge", "segment"):
        rec = audio_recipe("vggsound", recipe)
        config = {"audio": rec, "short_side": 256, "jpeg_quality": 90, "min_audio_s": 0.1}
        arrays = [process_av(clip, config).array for clip in clips[:2]]
        t0 = time.perf_counter()
        for i in range(repeats):
            x = np.array(arrays[i % len(arrays)], dtype=np.float32)  # the reader's copy out of the memory map
            if rec["kind"] == "waveform":
                start = crop_start(x.shape[-1], int(rec["window"]), True)
                x = waveform_segment_spectrogram(x, rec, start)
            else:
                start = crop_start(x.shape[-1], 626, True)
                x = np.ascontiguousarray(x[..., start : start + 626])
        ms = 1000 * (time.perf_counter() - t0) / repeats
        rows.append({"recipe": recipe, "ms_per_clip": ms, "bytes_per_clip": arrays[0].nbytes, "shape": x.shape})
    return rows


def main(argv=None) -> list[dict]:
    opts = parse_args(sys.argv[1:] if argv is None else argv, Options, "python -m data_prep.bench [clips=4]")
    torch.set_num_threads(1)  # one process = one core, as in the prep's pool
    with tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        cremad, kinetics = generate_clips(root, "cremad", opts.clips), generate_clips(root, "kinetics", opts.clips)
        print(f"generated {2 * (opts.clips + 1)} clips in {time.perf_counter() - t0:.1f} s (not timed below)")
        rows = [
            measure(cremad, "cremad", "ogm_ge"),
            measure(cremad, "cremad", "fbank"),
            measure(kinetics, "kinetics_sounds", "fbank"),
            measure(kinetics, "kinetics_sounds", "stft"),
            measure(kinetics, "vggsound", "ogm_ge"),
            measure(kinetics, "vggsound", "segment"),
        ]
        loads = load_cost(kinetics[1:])
    print(f"\nprep throughput, one process (torch threads 1), {opts.clips} clips each:")
    print(f"  {'dataset':<16} {'recipe':<7} {'clips/s':>8} {'ms/clip':>8} {'frames':>6} {'KB/clip':>8} {'of JPEG':>8}")
    for r in rows:
        print(
            f"  {r['dataset']:<16} {r['recipe']:<7} {r['clips_per_s']:>8.2f} {r['ms_per_clip']:>8.0f} "
            f"{r['frames']:>6} {r['bytes_per_clip'] / 1024:>8.0f} {r['frame_bytes_per_clip'] / 1024:>8.0f}"
        )
    print("\nVGGSound audio at load time, one core (train or eval, per clip):")
    for r in loads:
        print(
            f"  {r['recipe']:<8} {r['ms_per_clip']:>6.2f} ms, cache {r['bytes_per_clip'] / 1024:>5.0f} KB/clip of audio, "
            f"sample {list(r['shape'])}"
        )
    p = opts.processes
    print(f"\nprojected wall time on {p} processes (linear scaling; needs {p} free cores and a disk that keeps up):")
    for r in rows:
        if r["recipe"] in ("ogm_ge",) or (r["dataset"] == "kinetics_sounds" and r["recipe"] == "fbank"):
            n = FULL[r["dataset"]]
            wall = n / (r["clips_per_s"] * p)
            size = n * r["bytes_per_clip"] / 2**30
            print(f"  {r['dataset']:<16} {n:>7} clips: {wall / 60:6.1f} min, cache ~{size:.1f} GiB")
    return rows


if __name__ == "__main__":
    sys.exit(cli(main))
