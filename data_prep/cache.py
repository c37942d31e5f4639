"""The cache writer: the format is defined once, in :mod:`onthefly.data.cache`; this module fills it.

Resumable by construction: every finished clip (cached or failed) is a line in ``journal.jsonl``, written only
after its array row and JPEG bytes are flushed. A re-run reads the journal and skips every clip whose source
files are unchanged (same size and modification time); a failed clip is tried again when its files changed
(after ``git lfs pull``, say) or with ``retry_failed=true``. Each run appends new storage parts, so a crash
never leaves a half-written part that a later run would append to. ``index.csv``, ``layout.json`` and the frame
table are rebuilt from the journal at the end of every run.

Damage is repaired the same way: a finished clip whose stored bytes are gone or cut (a storage file deleted, or
truncated by a full disk or a broken copy) is forgotten when the writer opens, and so is a clip that ``make
verify-cache ARGS=mark=true`` marked ``damaged`` (bytes that do not decode); the next run re-prepares exactly
those clips into new parts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from data_prep.errors import PrepError
from onthefly import __version__
from onthefly.data.cache import (
    ARRAY_DIR,
    FORMAT_VERSION,
    FRAME_DIR,
    FRAME_TABLE_FILE,
    INDEX_COLUMNS,
    INDEX_FILE,
    JOURNAL_FILE,
    LAYOUT_FILE,
    OK,
    RECIPE_FILE,
    index_counts,
    npy_layout,
    read_json,
    write_json,
)

MAX_PART_BYTES = 2 << 30  # no storage file over 2 GiB (docs/data.md: no single file over a few GB)
DAMAGED = "damaged"  # a journal status: stored bytes that do not decode (make verify-cache ARGS=mark=true)


class CacheConflict(PrepError):
    """The output folder holds a cache made with another recipe (or one whose recipe.json is unreadable)."""


@dataclass
class Clip:
    """One unit of work: a clip as the listing found it. ``status`` other than ok is a failure known before any
    decoding (a file listed in a split but absent, a label outside the classes)."""

    id: str
    label: Optional[str]
    split: Optional[str]
    sources: dict[str, str] = field(default_factory=dict)  # role -> absolute path
    source: str = ""  # the main file, relative to the raw root (for the index)
    status: str = OK
    reason: str = ""


@dataclass
class Result:
    id: str
    status: str = OK
    reason: str = ""
    duration: float = 0.0
    n_frames: int = 0
    array: Optional[np.ndarray] = None
    jpegs: list[bytes] = field(default_factory=list)  # time-major: t0 s0, t0 s1, ..., t1 s0, ...


def code_version() -> str:
    """The package version and, in a git checkout, the commit (``+dirty`` when tracked files have changed)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "data_prep", "src"],
                capture_output=True,
                timeout=30,
            ).returncode
            != 0
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{commit}{'.dirty' if dirty else ''}"


def signature(sources: dict[str, str]) -> list:
    """(size, mtime) of each source file, None for an absent one: what tells a re-run that a file changed."""
    sig = []
    for role in sorted(sources):
        try:
            st = os.stat(sources[role])
            sig.append([role, st.st_size, st.st_mtime_ns])
        except OSError:
            sig.append([role, None, None])
    return sig


class CacheWriter:
    def __init__(
        self,
        root: Path | str,
        dataset: str,
        recipe: dict[str, Any],
        streams: list[str],
        array: Optional[dict[str, Any]] = None,
        overwrite: bool = False,
        retry_failed: bool = False,
        max_part_bytes: int = MAX_PART_BYTES,
        flush_every: int = 64,
    ):
        """``recipe``: everything that decides the cached values (compared with an existing cache's);
        ``array``: {"shape": [...], "dtype": "..."} of the fixed-size tensor per clip, or None."""
        self.root = Path(root)
        self.dataset, self.recipe, self.streams, self.array = dataset, recipe, list(streams), array
        self.retry_failed, self.max_part_bytes, self.flush_every = retry_failed, max_part_bytes, flush_every
        recipe_path = self.root / RECIPE_FILE
        if recipe_path.exists():
            try:
                old = read_json(recipe_path)
            except (OSError, ValueError) as err:
                if not overwrite:
                    raise CacheConflict(
                        f"{recipe_path} is damaged ({err}). It records what the cache in {self.root} was made with, "
                        "so nothing there can be reused safely: pass overwrite=true (ARGS=overwrite=true) to "
                        "rebuild it, or pick another out_root= (OUT=)."
                    ) from None
                old = {}
            same = (
                old.get("format") == FORMAT_VERSION
                and old.get("dataset") == dataset
                and _features(old) == _features(recipe)
            )
            if not same and not overwrite:
                raise CacheConflict(
                    f"{self.root} holds a {old.get('dataset')} cache made with another recipe:\n"
                    f"  there: {json.dumps(_features(old))}\n  asked: {json.dumps(_features(recipe))}\n"
                    "Pick another out_root= (OUT=), or pass overwrite=true (ARGS=overwrite=true) to delete it."
                )
            if not same:
                self._wipe()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ARRAY_DIR).mkdir(exist_ok=True)
        (self.root / FRAME_DIR).mkdir(exist_ok=True)
        if not recipe_path.exists():  # written first, so an interrupted prep still tells what it was making
            write_json(recipe_path, self._recipe_doc())
        self.done = self._read_journal()
        self.damaged = self._forget_damaged()  # ids whose stored bytes are gone: this run re-prepares them
        self._journal = open(self.root / JOURNAL_FILE, "a", encoding="utf-8")
        self._pending: list[str] = []
        self._array_part: Optional[np.ndarray] = None
        self._array_name, self._array_used = "", 0
        self._frames_file = None
        self._frames_name, self._frames_size = "", 0
        self._remaining = 0
        self._last_flush = time.monotonic()

    # --- state ------------------------------------------------------------------------------------------
    def _recipe_doc(self, **extra) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "dataset": self.dataset,
            "code_version": code_version(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "streams": self.streams,
            **self.recipe,
            **extra,
        }

    def _wipe(self) -> None:
        for name in (RECIPE_FILE, INDEX_FILE, LAYOUT_FILE, JOURNAL_FILE):
            (self.root / name).unlink(missing_ok=True)
        for sub in (ARRAY_DIR, FRAME_DIR):
            shutil.rmtree(self.root / sub, ignore_errors=True)

    def _read_journal(self) -> dict[str, dict]:
        return read_journal(self.root / JOURNAL_FILE)

    def _forget_damaged(self) -> list[str]:
        """Forget finished clips whose stored bytes are missing or cut (an array part whose size is not what
        its header needs, a frame part shorter than the clip's byte range), and delete array parts that are
        unusable as a whole (a cut .npy cannot be memory-mapped); return the ids forgotten."""
        rows: dict[str, int] = {}  # array part -> rows readable (0: the part is unusable)
        sizes: dict[str, int] = {}  # frame part -> bytes (-1: missing)
        damaged = []
        for clip_id, entry in self.done.items():
            if entry["status"] != OK:
                continue
            bad = False
            if "array" in entry:
                name, row = entry["array"]
                if name not in rows:
                    rows[name] = self._array_rows(name)
                bad = row >= rows[name]
            if "frames" in entry:
                name = entry["frame_part"]
                if name not in sizes:
                    sizes[name] = (self.root / name).stat().st_size if (self.root / name).exists() else -1
                bad = bad or any(offset + length > sizes[name] for offset, length in entry["frames"])
            if bad:
                damaged.append(clip_id)
        for clip_id in damaged:
            del self.done[clip_id]
        for name, n in rows.items():
            if n == 0:
                (self.root / name).unlink(missing_ok=True)
        return damaged

    def _array_rows(self, name: str) -> int:
        """How many rows the array part ``name`` holds, or 0 if it is missing, cut or not of this recipe."""
        try:
            shape, dtype, need = npy_layout(self.root / name)
            intact = (self.root / name).stat().st_size == need
        except (OSError, ValueError):
            return 0
        if not intact or list(shape[1:]) != list(self.array["shape"]) or dtype != np.dtype(self.array["dtype"]):
            return 0
        return int(shape[0])

    def needs(self, clip: Clip) -> bool:
        """Whether ``clip`` must be (re)computed."""
        entry = self.done.get(clip.id)
        if entry is None or entry.get("sig") != signature(clip.sources) or entry["status"] == DAMAGED:
            return True
        return self.retry_failed and entry["status"] != OK

    # --- writing ------------------------------------------------------------------------------------------
    def begin(self, n_todo: int) -> None:
        self._remaining = n_todo

    def _next_name(self, sub: str, ext: str) -> str:
        taken = [p.stem for p in (self.root / sub).glob(f"part-*{ext}")]
        number = max((int(s.split("-")[1]) for s in taken if s.split("-")[1].isdigit()), default=-1) + 1
        return f"{sub}/part-{number:05d}{ext}"

    def _array_slot(self) -> tuple[str, int]:
        if self._array_part is None or self._array_used == len(self._array_part):
            if self._array_part is not None:
                self._array_part.flush()
            row_bytes = int(np.prod(self.array["shape"])) * np.dtype(self.array["dtype"]).itemsize
            rows = max(1, min(self.max_part_bytes // row_bytes, self._remaining))
            self._array_name = self._next_name(ARRAY_DIR, ".npy")
            self._array_part = np.lib.format.open_memmap(
                self.root / self._array_name, mode="w+", dtype=self.array["dtype"], shape=(rows, *self.array["shape"])
            )
            self._array_used = 0
        self._array_used += 1
        return self._array_name, self._array_used - 1

    def _frame_part(self, incoming: int) -> str:
        if self._frames_file is None or self._frames_size + incoming > self.max_part_bytes and self._frames_size:
            if self._frames_file is not None:
                self._frames_file.close()
            self._frames_name = self._next_name(FRAME_DIR, ".bin")
            self._frames_file = open(self.root / self._frames_name, "wb")
            self._frames_size = 0
        return self._frames_name

    def add(self, clip: Clip, result: Result) -> None:
        self._remaining = max(0, self._remaining - 1)
        entry: dict[str, Any] = {
            "id": clip.id,
            "status": result.status,
            "reason": result.reason,
            "duration": round(float(result.duration), 3),
            "n_frames": result.n_frames,
            "sig": signature(clip.sources),
        }
        if result.status == OK:  # CRC-32s of the bytes as stored let `make verify-cache` find any later change
            if self.array is not None:
                name, row = self._array_slot()
                self._array_part[row] = result.array
                entry["array"], entry["array_crc"] = [name, row], zlib.crc32(self._array_part[row])
            if result.jpegs:
                name = self._frame_part(sum(len(b) for b in result.jpegs))
                offsets = []
                for data in result.jpegs:
                    offsets.append([self._frames_size, len(data)])
                    self._frames_file.write(data)
                    self._frames_size += len(data)
                entry["frame_part"], entry["frames"] = name, offsets
                entry["frame_crcs"] = [zlib.crc32(data) for data in result.jpegs]
        self.done[clip.id] = entry
        self._pending.append(json.dumps(entry))
        if len(self._pending) >= self.flush_every or time.monotonic() - self._last_flush > 10:
            self.flush()

    def flush(self) -> None:
        """Data first, then the journal lines that point at it."""
        if self._array_part is not None:
            self._array_part.flush()
        if self._frames_file is not None:
            self._frames_file.flush()
        if self._pending:
            self._journal.write("\n".join(self._pending) + "\n")
            self._journal.flush()
            self._pending = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._frames_file is not None:
            self._frames_file.close()
            self._frames_file = None
        self._array_part = None
        self._journal.close()

    # --- the readable side ----------------------------------------------------------------------------------
    def finalise(
        self,
        clips: Iterable[Clip],
        classes: list[str],
        splits: dict[str, Any],
        summary: Optional[dict[str, Any]] = None,
    ) -> pd.DataFrame:
        """Write index.csv, layout.json, the frame table and recipe.json for the clips of this listing."""
        rows, table = [], []
        array_parts: dict[str, int] = {}
        frame_parts: dict[str, int] = {}
        for clip in clips:
            row = {
                "id": clip.id,
                "label": clip.label or "",
                "split": clip.split or "",
                "n_frames": 0,
                "duration": 0.0,
                "status": clip.status,
                "reason": clip.reason,
                "source": clip.source,
                "array_part": -1,
                "array_row": -1,
                "frame_start": -1,
            }
            entry = self.done.get(clip.id) if clip.status == OK else None
            if clip.status == OK and entry is None:
                row.update(status="not_processed", reason="the prep stopped before this clip; run it again")
            elif entry is not None:
                row.update(
                    status=entry["status"],
                    reason=entry["reason"],
                    duration=entry["duration"],
                    n_frames=entry["n_frames"],
                )
                if entry["status"] == OK:
                    if "array" in entry:
                        name, r = entry["array"]
                        row.update(array_part=array_parts.setdefault(name, len(array_parts)), array_row=r)
                    if "frames" in entry:
                        part = frame_parts.setdefault(entry["frame_part"], len(frame_parts))
                        row["frame_start"] = len(table)
                        table.extend([part, off, length] for off, length in entry["frames"])
            rows.append(row)
        index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
        np.save(self.root / FRAME_TABLE_FILE, np.asarray(table, dtype=np.int64).reshape(-1, 3))
        layout = {"frames": {"streams": self.streams, "parts": list(frame_parts), "table": FRAME_TABLE_FILE}}
        layout["array"] = dict(self.array, parts=list(array_parts)) if self.array is not None else None
        write_json(self.root / LAYOUT_FILE, layout)
        tmp = self.root / (INDEX_FILE + ".tmp")
        index.to_csv(tmp, index=False)
        os.replace(tmp, self.root / INDEX_FILE)
        write_json(
            self.root / RECIPE_FILE,
            self._recipe_doc(classes=list(classes), splits=splits, summary=summary or {}, index=index_counts(index)),
        )
        return index


def read_journal(path: Path) -> dict[str, dict]:
    """Each clip's last journal entry, by id ({} without a journal)."""
    done: dict[str, dict] = {}
    if Path(path).exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: that clip is simply redone
                    continue
                done[entry["id"]] = entry
    return done


FEATURE_KEYS = ("audio", "frames", "flow", "rgb_diff", "min_audio_s")


def _features(doc: dict) -> dict:
    """The part of a recipe that decides cached values (splits and summaries may change freely), JSON-normalised."""
    return json.loads(json.dumps({k: doc.get(k) for k in FEATURE_KEYS}))
