"""The on-disk format of a prepared dataset cache: one definition for the writer (``data_prep``) and the readers.

A cache is a folder (``$ONTHEFLY_DATA/<dataset>`` by default)::

    recipe.json          what was computed (audio recipe, frame settings), the splits' source, the class names,
                         the format and code versions, the last prep's summary
    index.csv            one row per clip: id, label, split, n_frames, duration, status, reason, source,
                         array_part, array_row, frame_start (status "ok" rows are the usable ones)
    layout.json          the storage files: fixed-size arrays (``.npy`` parts, memory-mapped) and JPEG parts
    arrays/part-*.npy    [rows, *shape] fixed-size tensors (spectrograms), one row per cached clip
    frames/part-*.bin    JPEG bytes, concatenated
    frames/table.npy     int64 [frames, 3]: (part, byte offset, byte length) per JPEG
    journal.jsonl        the writer's progress log (what makes a prep resumable; readers ignore it)

A clip's JPEGs sit in the table at rows ``frame_start + t * len(streams) + s`` for time ``t`` and image stream
``s`` (``["visual"]``, or ``["visual", "flow_u", "flow_v"]`` for UCF-101). Paths in ``layout.json`` are relative
to the cache folder, so a merged sharded cache (VGGSound) simply lists its shards' files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from onthefly.data.base import CacheMissingError

FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
INDEX_FILE = "index.csv"
LAYOUT_FILE = "layout.json"
JOURNAL_FILE = "journal.jsonl"
FRAME_TABLE_FILE = "frames/table.npy"
ARRAY_DIR = "arrays"
FRAME_DIR = "frames"
INDEX_COLUMNS = ["id", "label", "split", "n_frames", "duration", "status", "reason", "source",
                 "array_part", "array_row", "frame_start"]
OK = "ok"
SPLITS = ("train", "val", "test")

# Audio recipes (DATA.md), by dataset and name. The prep computes exactly these; a reader expects them, so a
# cache made with other parameters is refused. Steps, in order: mono at `sample_rate`; `tile` to exactly that
# many samples (repeat, then cut); `clip` to [-1, 1]; `subtract_mean`; then either `stft` (log(|X| + eps), Hann,
# centred: [n_fft/2 + 1, frames]) or `fbank` (kaldi fbank, Hann window, no dither, no energy: [frames, mel]),
# padded with zeros or cut to `frames`; then (x - norm_mean) / norm_std. `shape` is the result; `dtype` its storage.
AUDIO_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "cremad": {
        "ogm_ge": {"kind": "stft", "sample_rate": 22050, "tile": 66150, "clip": True, "subtract_mean": False,
                   "n_fft": 512, "hop_length": 353, "eps": 1e-7, "shape": [257, 188], "dtype": "float32"},
        "fbank": {"kind": "fbank", "sample_rate": 16000, "tile": 48000, "clip": True, "subtract_mean": True,
                  "num_mel_bins": 128, "frame_length_ms": 25.0, "frame_shift_ms": 10.0, "frames": 298,
                  "shape": [298, 128], "dtype": "float32"},
    },
    "kinetics_sounds": {
        "fbank": {"kind": "fbank", "sample_rate": 16000, "tile": None, "clip": False, "subtract_mean": True,
                  "num_mel_bins": 128, "frame_length_ms": 25.0, "frame_shift_ms": 10.0, "frames": 1024,
                  "norm_mean": -4.503877, "norm_std": 5.141276 * 2, "shape": [1024, 128], "dtype": "float32"},
        # the CVPR paper's 257 x 1,004 log spectrogram: 10 ms hop over 1,003 hops (10.03 s) of 16-kHz audio
        "stft": {"kind": "stft", "sample_rate": 16000, "tile": 160480, "clip": True, "subtract_mean": False,
                 "n_fft": 512, "hop_length": 160, "eps": 1e-7, "shape": [257, 1004], "dtype": "float32"},
    },
    "vggsound": {
        # the whole 10-s clip; readers crop 626 frames (5 s): random in training, the centre in evaluation
        "ogm_ge": {"kind": "stft", "sample_rate": 16000, "tile": 160000, "clip": True, "subtract_mean": False,
                   "n_fft": 256, "hop_length": 128, "eps": 1e-7, "shape": [129, 1251], "dtype": "float16"},
    },
}

# The make target that builds each dataset's cache (named in every refusal).
PREP_COMMANDS = {
    "cremad": "make prep-cremad RAW=/path/to/CREMA-D",
    "kinetics_sounds": "make prep-kinetics-sounds RAW=/path/to/kinetics400",
    "vggsound": "make prep-vggsound RAW=/path/to/vggsound CSV=/path/to/vggsound.csv",
    "ucf101": "make prep-ucf101 RAW=/path/to/UCF-101 SPLITS=/path/to/ucfTrainTestlist FLOW=/path/to/tvl1_flow",
    "avqa": "make prep-avqa ANN=/path/to/avqa MEDIA=/path/to/vggsound",
    "avqa_music": "make prep-avqa FORMAT=music ANN=/path/to/MUSIC-AVQA/json MEDIA=/path/to/MUSIC-AVQA/videos",
    "mosi": "make prep-mosi PKL=/path/to/mosi_data.pkl",
}


class CacheMismatchError(CacheMissingError):
    """The cache exists but was made with a recipe (or split) other than the config asks for."""


def audio_recipe(dataset: str, name: str) -> dict[str, Any]:
    """The recipe's parameters, with its name, as recorded in ``recipe.json``."""
    try:
        params = AUDIO_RECIPES[dataset][name]
    except KeyError:
        known = sorted(AUDIO_RECIPES.get(dataset, {}))
        raise ValueError(f"{dataset} has no audio recipe {name!r}; known: {known}") from None
    return {"name": name, **params}


def prep_command(dataset: str, root: Path | str, extra: str = "") -> str:
    return f"{PREP_COMMANDS[dataset]} OUT={root}{' ' + extra if extra else ''}"


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: dict) -> None:
    """Write atomically (a crash leaves the old file or the new one, never half of one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_index(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "label": str, "split": str, "status": str, "reason": str,
                                    "source": str}, keep_default_na=False)


class CacheReader:
    """Random access to one cache: its recipe, index, fixed-size arrays (memory-mapped) and JPEG bytes.

    Files are opened lazily in each process, so a reader can be handed to DataLoader workers (fork or spawn).
    """

    def __init__(self, root: Path | str, dataset: str):
        self.root = Path(root)
        self.dataset = dataset
        command = prep_command(dataset, self.root)
        if not (self.root / RECIPE_FILE).exists():
            raise CacheMissingError(
                f"No {dataset} cache at {self.root}. Build it with `{command}`, or point paths.data_root "
                f"(env ONTHEFLY_DATA) or dataset.root at the folder that holds it."
            )
        if not (self.root / INDEX_FILE).exists():
            raise CacheMissingError(
                f"The {dataset} cache at {self.root} is incomplete (its prep did not finish). Run `{command}` "
                "again: it resumes where it stopped."
            )
        self.recipe = read_json(self.root / RECIPE_FILE)
        if self.recipe.get("format") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"The cache at {self.root} has format {self.recipe.get('format')}; this code reads format "
                f"{FORMAT_VERSION}. Rebuild it with `{command} ARGS=overwrite=true`."
            )
        self.layout = read_json(self.root / LAYOUT_FILE)
        self.index = read_index(self.root / INDEX_FILE)
        self.streams: list[str] = list(self.layout["frames"]["streams"])
        self._arrays: dict[int, np.ndarray] = {}
        self._frame_files: dict[int, Any] = {}
        self._table: Optional[np.ndarray] = None

    # --- metadata ---------------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.recipe["classes"])

    @property
    def array_shape(self) -> Optional[tuple[int, ...]]:
        array = self.layout.get("array")
        return tuple(array["shape"]) if array else None

    def ok_rows(self) -> pd.DataFrame:
        return self.index[self.index["status"] == OK]

    def check(self, expected: dict[str, Any], fix: dict[str, str]) -> None:
        """Refuse a cache whose recipe differs from ``expected`` ({dotted key: value}).

        ``fix`` maps a dotted key to the prep argument that makes a matching cache (e.g. ``AUDIO=fbank``).
        """
        diffs = []
        for key, want in expected.items():
            have: Any = self.recipe
            for part in key.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            if isinstance(have, dict) and isinstance(want, dict) and have.get("name") != want.get("name"):
                diffs.append((f"{key}.name", have.get("name"), want.get("name")))  # another recipe altogether
            elif isinstance(have, dict) and isinstance(want, dict):
                diffs += [(f"{key}.{k}", have.get(k), want.get(k)) for k in sorted(set(have) | set(want), key=str)
                          if _normal(have.get(k)) != _normal(want.get(k))]
            elif _normal(have) != _normal(want):
                diffs.append((key, have, want))
        if diffs:
            lines = "\n".join(f"  {k}: cache has {h!r}, config asks for {w!r}" for k, h, w in diffs)
            args = " ".join(dict.fromkeys(fix[k.split(".")[0] if k.split(".")[0] in fix else k]
                                          for k, _, _ in diffs if k in fix or k.split(".")[0] in fix))
            raise CacheMismatchError(
                f"The {self.dataset} cache at {self.root} was prepared differently from what the config asks:\n"
                f"{lines}\nEither change the config to match the cache, or build a matching cache (into another "
                f"folder, then set dataset.root) with `{prep_command(self.dataset, '<folder>', args)}`."
            )

    # --- data -------------------------------------------------------------------------------------------
    def array(self, part: int, row: int) -> np.ndarray:
        arr = self._arrays.get(part)
        if arr is None:
            arr = np.load(self.root / self.layout["array"]["parts"][part], mmap_mode="r")
            self._arrays[part] = arr
        return arr[row]

    def frame_table(self) -> np.ndarray:
        if self._table is None:
            self._table = np.load(self.root / FRAME_TABLE_FILE)
        return self._table

    def jpeg(self, table_row: int) -> bytes:
        part, offset, length = (int(v) for v in self.frame_table()[table_row])
        fd = self._frame_files.get(part)
        if fd is None:
            fd = os.open(self.root / self.layout["frames"]["parts"][part], os.O_RDONLY)
            self._frame_files[part] = fd
        return os.pread(fd, length, offset)

    def __getstate__(self):  # open files and maps stay in the process that opened them
        state = dict(self.__dict__)
        state.update(_arrays={}, _frame_files={}, _table=None)
        return state

    def __del__(self):
        for fd in getattr(self, "_frame_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def _normal(value: Any) -> Any:
    """Compare recipes loosely where JSON loses types (tuples become lists, 1e-7 survives as a float)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 9)
    return value
