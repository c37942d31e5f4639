"""The driver every prep command shares: ``key=value`` arguments, the process pool with a progress bar, the
cache writer, and the summary printed at the end (clips found, cached, skipped by reason, per split, time).

A clip never crashes a run: a :class:`~data_prep.media.MediaError` becomes its status and reason, and so does
any other exception raised while processing it (status ``error``, with the exception in the reason). A run
that finds no clip, or caches none, is an error (:class:`~data_prep.errors.PrepError`) naming what it expected
where; ``main()`` of each prep turns it into a message and a non-zero exit code (:func:`cli`).

Worker processes end with the main process: on SIGTERM the main process stops its pool and flushes the
journal first (what was finished is kept); if it is killed outright (SIGKILL, a crash), each worker notices
that its parent is gone and exits (:mod:`data_prep.parent`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import typing
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from data_prep import audio as recipes
from data_prep.cache import CacheWriter, Clip, Result
from data_prep.errors import PrepError, UsageError
from data_prep.media import MediaError, check_audio, decode_container, encode_frame, read_wav
from data_prep.parent import PARENT_ENV, exit_with_parent
from onthefly.data.cache import (
    DOWNMIX,
    FRAME_TIMES,
    INDEX_FILE,
    OK,
    RECIPE_FILE,
    RESAMPLE,
    SPLITS,
    read_json,
    write_json,
)
from onthefly.data.cache import audio_recipe as recipes_for
from onthefly.progress import bar as progress_bar


# --- arguments --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CommonOptions:
    raw_root: str = ""  # the dataset as downloaded (required)
    out_root: Optional[str] = None  # default: $ONTHEFLY_DATA/<dataset>, or data/<dataset>
    workers: int = 0  # processes; 0: one per CPU core; 1: in this process
    short_side: int = 256  # frames are stored with at most this short side (0: as decoded)
    jpeg_quality: int = 90
    min_audio_s: float = 0.1  # shorter audio is refused (status audio_too_short)
    frame_times: str = "centre"  # centre: the frame at the centre of each second | second_start: the first frame of each second (released code)
    overwrite: bool = False  # delete a cache made with another recipe in out_root
    retry_failed: bool = False  # try failed clips again even if their files did not change
    progress: bool = True


def _convert(text: str, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        if text.lower() in ("null", "none", ""):
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return kind(text)


def cli(run: Callable[[list[str]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """The exit code of ``run(argv)`` as a command: 0 when it returns; a :class:`PrepError` printed (without a
    traceback) and its code (1, or 2 for a usage mistake); 143 after SIGTERM, 130 after Ctrl-C."""
    try:
        run(list(sys.argv[1:] if argv is None else argv))
    except PrepError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except Terminated:
        print("stopped by SIGTERM; finished clips are kept: run the same command again to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted; finished clips are kept: run the same command again to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def parse_args(argv: Sequence[str], options_cls: type, usage: str) -> Any:
    """``key=value`` arguments -> an ``options_cls`` instance (a dataclass); a :class:`UsageError` with the usage
    and every option's default on a mistake (and for ``--help``, with exit code 0)."""
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}

    def fail(message: str, code: int = 2):
        keys = "\n".join(f"  {name}={f.default!r}" for name, f in fields.items())
        raise UsageError(f"{message}\nusage: {usage}\noptions (defaults):\n{keys}".lstrip(), code)

    values = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            fail("", code=0)
        key, sep, text = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            fail(f"expected key=value, got {arg!r}")
        if key not in fields:
            fail(f"unknown option {key!r}")
        try:
            values[key] = _convert(text, hints[key])
        except ValueError as err:
            fail(f"{key}: {err}")
    opts = options_cls(**values)
    if getattr(opts, "raw_root", None) == "":
        fail("raw_root= is required")
    if getattr(opts, "frame_times", "centre") not in FRAME_TIMES:
        fail(f"frame_times: must be one of {', '.join(FRAME_TIMES)}, got {opts.frame_times!r}")
    if getattr(opts, "downmix", "pyav") not in DOWNMIX:
        fail(f"downmix: must be one of {', '.join(DOWNMIX)}, got {opts.downmix!r}")
    if getattr(opts, "resample", "sinc") not in RESAMPLE:
        fail(f"resample: must be one of {', '.join(RESAMPLE)}, got {opts.resample!r}")
    return opts


def default_out(dataset: str) -> Path:
    return Path(os.environ.get("ONTHEFLY_DATA") or "data") / dataset


def frame_recipe(opts: CommonOptions) -> dict[str, Any]:
    return {
        "fps": 1,
        "times": FRAME_TIMES[opts.frame_times],
        "short_side": opts.short_side or None,
        "jpeg_quality": opts.jpeg_quality,
    }


# --- workers ----------------------------------------------------------------------------------------------------
_WORK: Optional[Callable[[Clip, dict], Result]] = None
_CONFIG: dict = {}


class Terminated(BaseException):
    """SIGTERM reached the prep's main process: raised there so that the pool stops and the journal is flushed
    (a BaseException, like KeyboardInterrupt, so that no per-clip ``except Exception`` records it as a clip's
    error)."""


def _init_worker(work: Callable, config: dict, parent: Optional[int] = None) -> None:
    global _WORK, _CONFIG
    _WORK, _CONFIG = work, config
    if parent is not None:  # a pool worker (not the main process running clips itself)
        exit_with_parent(parent)
    import torch

    torch.set_num_threads(1)


def _work(clip: Clip) -> tuple[str, Result]:
    try:
        result = _WORK(clip, _CONFIG)
    except MediaError as err:
        result = Result(clip.id, status=err.status, reason=str(err))
    except Exception as err:  # noqa: BLE001 (a bug or an odd file must not end the run: record it)
        result = Result(clip.id, status="error", reason=f"{type(err).__name__}: {err}")
    return clip.id, result


def _results(todo: list[Clip], work: Callable, config: dict, workers: int):
    if workers <= 1 or len(todo) <= 1:
        _init_worker(work, config)
        yield from map(_work, todo)
        return
    ctx = mp.get_context("spawn")  # no fork after torch has started threads
    before = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = str(os.getpid())  # the workers watch this process from their first import on
    try:
        pool = ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(work, config, os.getpid()))
    finally:
        if before is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = before
    with pool:
        yield from pool.imap_unordered(_work, todo, chunksize=1)  # leaving the block terminates the workers


class _TermAsException:
    """While active (main thread only), SIGTERM raises :class:`Terminated` in the main process instead of ending
    it on the spot, so ``finally`` blocks run: the pool is terminated and the journal flushed."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Terminated()

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def process_av(clip: Clip, config: dict) -> Result:
    """An audio-visual clip: the audio recipe (from ``sources['audio']`` if given, else the container's audio
    track) and the 1-fps frames of ``sources['video']`` as JPEG bytes."""
    rec = config["audio"]
    rate, downmix, resample = int(rec["sample_rate"]), rec.get("downmix", "pyav"), rec.get("resample", "sinc")
    times = config.get("frame_times", "centre")
    if "audio" in clip.sources:  # a separate file (CREMA-D's WAV): check it before decoding any video
        wave = check_audio(
            read_wav(Path(clip.sources["audio"]), rate, downmix, resample),
            rate,
            config["min_audio_s"],
            Path(clip.sources["audio"]),
        )
        decoded = decode_container(Path(clip.sources["video"]), short_side=config["short_side"], frame_times=times)
    else:
        decoded = decode_container(
            Path(clip.sources["video"]),
            audio_rate=rate,
            short_side=config["short_side"],
            frame_times=times,
            downmix=downmix,
        )
        wave = check_audio(decoded.audio, rate, config["min_audio_s"], Path(clip.sources["video"]))
    array = recipes.compute(wave, rec)
    jpegs = [encode_frame(f, config["jpeg_quality"]) for f in decoded.frames]
    return Result(clip.id, duration=decoded.duration, n_frames=len(jpegs), array=array, jpegs=jpegs)


# --- the run ----------------------------------------------------------------------------------------------------
def run_prep(
    *,
    dataset: str,
    clips: list[Clip],
    out_root: Path,
    recipe: dict[str, Any],
    streams: list[str],
    array: Optional[dict[str, Any]],
    classes: list[str],
    splits: dict[str, Any],
    work: Callable,
    opts: CommonOptions,
    raw_root: Path,
    expected: str,
) -> dict[str, Any]:
    """Process every clip that needs it, write the cache, print and return the summary. ``expected`` says
    what the listing looked for where (``"VideoFlash/<clip>.flv ... under raw_root=..."``): a run that finds
    no clip, or ends with none cached, raises :class:`PrepError` with it (after writing the index, whose
    status and reason columns say why each clip failed)."""
    if not clips:
        raise PrepError(f"{dataset}: no clip found. Expected {expected}.")
    t0 = time.time()
    workers = opts.workers or os.cpu_count() or 1
    writer = CacheWriter(
        out_root, dataset, recipe, streams, array, overwrite=opts.overwrite, retry_failed=opts.retry_failed
    )
    if writer.damaged:
        print(
            f"{dataset}: {len(writer.damaged)} finished clips have damaged or missing stored data (e.g. "
            f"{writer.damaged[0]}): preparing them again"
        )
    todo = [c for c in clips if c.status == OK and writer.needs(c)]
    writer.begin(len(todo))
    by_id = {c.id: c for c in todo}
    config = {
        **recipe,
        "short_side": opts.short_side or None,
        "jpeg_quality": opts.jpeg_quality,
        "min_audio_s": opts.min_audio_s,
        "audio": recipe.get("audio"),
        "frame_times": getattr(opts, "frame_times", "centre"),
    }
    results = _results(todo, work, config, workers)
    try:
        with _TermAsException():
            bar = progress_bar(
                results, total=len(todo), desc=f"prep {dataset}", unit="clip", enabled=opts.progress and bool(todo)
            )
            for clip_id, result in bar:
                writer.add(by_id[clip_id], result)
    finally:
        results.close()  # stops the pool now (not when the generator is collected)
        writer.close()
    index = writer.finalise(clips, classes, splits)
    summary = summarise(index, dataset, out_root, processed=set(by_id), seconds=time.time() - t0, workers=workers)
    doc = read_json(out_root / RECIPE_FILE)
    doc["summary"] = summary
    write_json(out_root / RECIPE_FILE, doc)
    print(format_summary(summary, raw_root))
    if summary["cached"] == 0:
        reasons = "; ".join(
            f"{k} {v}: e.g. {summary['example_reason'].get(k, '')}" for k, v in summary["skipped"].items()
        )
        raise PrepError(
            f"{dataset}: none of the {summary['found']} clips found could be cached ({reasons}). Expected "
            f"{expected}. Each clip's status and reason: {out_root / INDEX_FILE}. Fix the files and run the same "
            "command again: it redoes the clips whose files changed (retry_failed=true redoes every failed one)."
        )
    return summary


def prep_audio_visual(
    dataset: str,
    classes: Sequence[str],
    options_cls: type,
    list_clips: Callable,
    usage: str,
    argv: Sequence[str],
    expected: str,
) -> dict:
    """The whole prep of a dataset whose clips are one container with an audio and a video stream (plus an
    optional WAV): parse key=value options, list the clips, cache audio + frames with the dataset's recipe.
    ``expected`` (formatted with ``raw``): what the listing looks for where."""
    opts = parse_args(argv, options_cls, usage)
    raw = existing_folder(opts.raw_root, "raw_root")
    clips, splits = list_clips(raw, opts)
    rec = recipes_for(dataset, opts.audio, getattr(opts, "downmix", "pyav"), getattr(opts, "resample", "sinc"))
    recipe = {"audio": rec, "frames": frame_recipe(opts), "min_audio_s": opts.min_audio_s}
    out = Path(opts.out_root).expanduser() if opts.out_root else default_out(dataset)
    return run_prep(
        dataset=dataset,
        clips=clips,
        out_root=out,
        recipe=recipe,
        streams=["visual"],
        array={"shape": rec["shape"], "dtype": rec["dtype"]},
        classes=list(classes),
        splits=splits,
        work=process_av,
        opts=opts,
        raw_root=raw,
        expected=expected.format(raw=raw),
    )


def existing_folder(path: str, option: str) -> Path:
    """``path`` (``~`` expanded) if it is a folder, else a :class:`PrepError` naming ``option``."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PrepError(f"{option}={folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    return folder


def summarise(index, dataset: str, out_root: Path, processed: set[str], seconds: float, workers: int) -> dict[str, Any]:
    ok = index["status"] == OK
    failed = index[~ok]
    per_split = {}
    for split in [*SPLITS, ""]:
        rows = index[index["split"] == split]
        if len(rows):
            per_split[split or "(none)"] = {"listed": int(len(rows)), "cached": int((rows["status"] == OK).sum())}
    first_reason = failed.groupby("status")["reason"].first().to_dict() if len(failed) else {}
    return {
        "dataset": dataset,
        "out_root": str(out_root),
        "found": int(len(index)),
        "cached": int(ok.sum()),
        "processed_now": len(processed),
        "reused": int((ok & ~index["id"].isin(processed)).sum()),
        "skipped": {k: int(v) for k, v in Counter(failed["status"]).most_common()},
        "example_reason": {k: str(v) for k, v in first_reason.items()},
        "per_split": per_split,
        "seconds": round(seconds, 2),
        "workers": workers,
    }


def format_summary(s: dict[str, Any], raw_root: Path) -> str:
    skipped = sum(s["skipped"].values())
    lines = [
        f"{s['dataset']}: {s['found']} clips found -> {s['out_root']}  ({s['seconds']:.1f} s, {s['workers']} workers)",
        f"  cached   {s['cached']:>7}   (processed in this run: {s['processed_now']}, reused: {s['reused']})",
        f"  skipped  {skipped:>7}   " + ", ".join(f"{k} {v}" for k, v in s["skipped"].items()),
    ]
    for status, reason in s["example_reason"].items():
        lines.append(f"    {status}: e.g. {reason}")
    if "lfs_pointer" in s["skipped"]:
        lines.append(
            f"  {s['skipped']['lfs_pointer']} clips are git-LFS pointer files: run `git lfs pull` in "
            f"{raw_root}, then this command again (only the changed clips are redone)"
        )
    lines.append(f"  {'split':<8} {'listed':>7} {'cached':>7}")
    for split, counts in s["per_split"].items():
        lines.append(f"  {split:<8} {counts['listed']:>7} {counts['cached']:>7}")
    lines.append(f"  index (a status and reason per clip): {Path(s['out_root']) / 'index.csv'}")
    return "\n".join(lines)


def stratified_test(labels: Sequence[str], test_size: int, seed: int) -> np.ndarray:
    """A boolean mask of exactly ``test_size`` items, spread over the labels in proportion (largest remainder)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * test_size / max(1, len(labels))
    take = np.floor(share).astype(int)
    for i in np.argsort(-(share - take), kind="stable")[: test_size - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        mask[rng.permutation(members)[:k]] = True
    return mask
