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

Opening a cache checks it without decoding anything (:meth:`CacheReader.check_files`): every storage file must
be as long as its header and the frame table say, every usable row must point inside them, and index.csv must
hold the clip counts recipe.json recorded. A damaged cache stops there with the file, the clips and the command
that repairs it (:class:`~onthefly.data.base.CacheDamagedError`); ``make verify-cache`` decodes everything.

A clip's JPEGs sit in the table at rows ``frame_start + t * len(streams) + s`` for time ``t`` and image stream
``s`` (``["visual"]``, or ``["visual", "flow_u", "flow_v"]`` for UCF-101). Paths in ``layout.json`` are relative
to the cache folder, so a merged sharded cache (VGGSound) simply lists its shards' files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from onthefly.data.base import CacheDamagedError, CacheMissingError

FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
INDEX_FILE = "index.csv"
LAYOUT_FILE = "layout.json"
JOURNAL_FILE = "journal.jsonl"
FRAME_TABLE_FILE = "frames/table.npy"
ARRAY_DIR = "arrays"
FRAME_DIR = "frames"
INDEX_COLUMNS = [
    "id",
    "label",
    "split",
    "n_frames",
    "duration",
    "status",
    "reason",
    "source",
    "array_part",
    "array_row",
    "frame_start",
]
OK = "ok"
SPLITS = ("train", "val", "test")

# Audio recipes (docs/data.md), by dataset and name. The prep computes exactly these; a reader expects them, so a
# cache made with other parameters is refused. Steps, in order: mono at `sample_rate`; `tile` to exactly that
# many samples (repeat, then cut); `clip` to [-1, 1]; `subtract_mean`; then either `stft` (log(|X| + eps), Hann,
# centred: [n_fft/2 + 1, frames]) or `fbank` (kaldi fbank, Hann window, no dither, no energy: [frames, mel]),
# padded with zeros or cut to `frames`; then (x - norm_mean) / norm_std. `shape` is the result; `dtype` its storage.
AUDIO_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "cremad": {
        "ogm_ge": {
            "kind": "stft",
            "sample_rate": 22050,
            "tile": 66150,
            "clip": True,
            "subtract_mean": False,
            "n_fft": 512,
            "hop_length": 353,
            "eps": 1e-7,
            "shape": [257, 188],
            "dtype": "float32",
        },
        "fbank": {
            "kind": "fbank",
            "sample_rate": 16000,
            "tile": 48000,
            "clip": True,
            "subtract_mean": True,
            "num_mel_bins": 128,
            "frame_length_ms": 25.0,
            "frame_shift_ms": 10.0,
            "frames": 298,
            "shape": [298, 128],
            "dtype": "float32",
        },
    },
    "kinetics_sounds": {
        "fbank": {
            "kind": "fbank",
            "sample_rate": 16000,
            "tile": None,
            "clip": False,
            "subtract_mean": True,
            "num_mel_bins": 128,
            "frame_length_ms": 25.0,
            "frame_shift_ms": 10.0,
            "frames": 1024,
            "norm_mean": -4.503877,
            "norm_std": 5.141276 * 2,
            "shape": [1024, 128],
            "dtype": "float32",
        },
        # the CVPR paper's 257 x 1,004 log spectrogram: 10 ms hop over 1,003 hops (10.03 s) of 16-kHz audio
        "stft": {
            "kind": "stft",
            "sample_rate": 16000,
            "tile": 160480,
            "clip": True,
            "subtract_mean": False,
            "n_fft": 512,
            "hop_length": 160,
            "eps": 1e-7,
            "shape": [257, 1004],
            "dtype": "float32",
        },
    },
    "vggsound": {
        # the whole 10-s clip; readers crop 626 frames (5 s): random in training, the centre in evaluation
        "ogm_ge": {
            "kind": "stft",
            "sample_rate": 16000,
            "tile": 160000,
            "clip": True,
            "subtract_mean": False,
            "n_fft": 256,
            "hop_length": 128,
            "eps": 1e-7,
            "shape": [129, 1251],
            "dtype": "float16",
        },
        # the CVPR release's recipe (docs/method.md §9): the first 10 s of the tiled waveform are cached; a reader
        # takes a `window` of it (5 s, any start in 0..5 s), clips it to [-1, 1] and takes the log-STFT of that
        # segment alone: 129 x 626
        "segment": {
            "kind": "waveform",
            "sample_rate": 16000,
            "tile": 160000,
            "clip": False,
            "subtract_mean": False,
            "window": 80000,
            "segment_clip": True,
            "n_fft": 256,
            "hop_length": 128,
            "eps": 1e-7,
            "shape": [160000],
            "dtype": "float32",
        },
    },
}

# How a multi-channel audio track becomes mono (a prep option, recorded in the recipe as "downmix" when it is not
# the default): pyav = FFmpeg's mono layout mix (each of two channels x 0.707), mean = the channel mean (librosa,
# the CVPR CREMA-D / VGGSound recipes), first = channel 0 (the CVPR Kinetics-Sounds fbank, via torchaudio). A WAV
# read with soundfile has no FFmpeg mix: pyav and mean both average its channels there.
DOWNMIX = ("pyav", "mean", "first")
DEFAULT_DOWNMIX = "pyav"
# How a WAV at another rate is resampled (a prep option, recorded as "resample" when it is not the default):
# sinc = torchaudio's default windowed sinc; kaiser_best = librosa's default before 0.10 (resampy's kaiser_best,
# which the CVPR CREMA-D loader used), as torchaudio's Kaiser-windowed sinc with its parameters.
RESAMPLE = ("sinc", "kaiser_best")
# the audio prep options and their defaults (a recipe records only those that differ)
AUDIO_PREP_DEFAULTS = {"downmix": DEFAULT_DOWNMIX, "resample": "sinc"}
# Which frames the prep caches (recipe.json "frames.times"; a prep option): `centre` = the frame on screen at the
# centre of each second (docs/data.md); `second_start` = every int(fps)-th decoded frame from the first, i.e. the first
# frame of each second as the released extraction scripts count seconds.
FRAME_TIMES = {"centre": "centre of each second", "second_start": "first frame of each second"}

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


def audio_recipe(dataset: str, name: str, downmix: str = DEFAULT_DOWNMIX, resample: str = "sinc") -> dict[str, Any]:
    """The recipe's parameters, with its name (and its downmix and resampler where they are not the defaults), as
    recorded in ``recipe.json``."""
    try:
        params = AUDIO_RECIPES[dataset][name]
    except KeyError:
        known = sorted(AUDIO_RECIPES.get(dataset, {}))
        raise ValueError(f"{dataset} has no audio recipe {name!r}; known: {known}") from None
    if downmix not in DOWNMIX:
        raise ValueError(f"downmix must be one of {list(DOWNMIX)}, got {downmix!r}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {list(RESAMPLE)}, got {resample!r}")
    chosen = {"downmix": downmix, "resample": resample}
    return {"name": name, **params, **{k: v for k, v in chosen.items() if v != AUDIO_PREP_DEFAULTS[k]}}


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
    return pd.read_csv(
        path,
        dtype={"id": str, "label": str, "split": str, "status": str, "reason": str, "source": str},
        keep_default_na=False,
    )


def index_counts(index: pd.DataFrame) -> dict[str, Any]:
    """What recipe.json records of an index (``"index"``), so that a reader can tell an edited index: its
    rows, and its usable rows per split."""
    ok = index["status"] == OK
    return {"rows": int(len(index)), "ok": {s: int((ok & (index["split"] == s)).sum()) for s in SPLITS}}


def load_json(path: Path, damaged: str) -> dict:
    """``path`` as a dict, or a :class:`CacheDamagedError` that names it and ends with ``damaged`` (the fix)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CacheDamagedError(f"{path} is damaged (not readable JSON: {err}). {damaged}") from None
    if not isinstance(data, dict):
        raise CacheDamagedError(f"{path} is damaged (a JSON {type(data).__name__}, not an object). {damaged}")
    return data


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, the file size they need) from an .npy file's header, reading nothing else; ValueError if
    the header is unreadable."""
    with open(path, "rb") as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except EOFError as err:
            raise ValueError(str(err)) from None
        return tuple(shape), dtype, f.tell() + int(np.prod(shape)) * dtype.itemsize


def check_npy(path: Path, what: str, shape: Optional[tuple] = None, dtype: Optional[str] = None) -> tuple[int, ...]:
    """The shape of the .npy file ``path``; a :class:`CacheDamagedError` (sentence naming the file and ``what``
    it holds, without the fix) if it is missing, cut, padded, or of another shape or dtype than asked (``None``
    in ``shape``: any size on that axis)."""
    problem = None
    try:
        have, have_dtype, need = npy_layout(path)
        size = os.stat(path).st_size
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError) as err:
        problem = f"has no readable .npy header ({err})"
    else:
        if size != need:
            problem = f"is {size:,} bytes long where its header needs {need:,} ({'cut' if size < need else 'padded'})"
        elif shape is not None and (
            len(have) != len(shape) or any(w is not None and w != h for w, h in zip(shape, have))
        ):
            problem = f"holds an array of shape {list(have)}, not {['*' if w is None else w for w in shape]}"
        elif dtype is not None and have_dtype != np.dtype(dtype):
            problem = f"holds {have_dtype}, not {np.dtype(dtype)}"
    if problem:
        raise CacheDamagedError(f"{path} ({what}) {problem}.")
    return have


class CacheReader:
    """Random access to one cache: its recipe, index, fixed-size arrays (memory-mapped) and JPEG bytes.

    Opening checks the files against the index (no decoding; see :meth:`check_files`). Files are opened lazily
    in each process, so a reader can be handed to DataLoader workers (fork or spawn). ``command``: the prep
    command that makes this cache, when it is not the dataset's own (AVQA's media cache).
    """

    def __init__(self, root: Path | str, dataset: str, command: Optional[str] = None):
        self.root = Path(root)
        self.dataset = dataset
        self.command = command or prep_command(dataset, self.root)
        if not (self.root / RECIPE_FILE).exists():
            raise CacheMissingError(
                f"No {dataset} cache at {self.root}. Build it with `{self.command}`, or point paths.data_root "
                f"(env ONTHEFLY_DATA) or dataset.root at the folder that holds it."
            )
        if not (self.root / INDEX_FILE).exists():
            raise CacheMissingError(
                f"The {dataset} cache at {self.root} is incomplete (its prep did not finish). Run `{self.command}` "
                "again: it resumes where it stopped."
            )
        self.recipe = load_json(
            self.root / RECIPE_FILE,
            f"It records how the cache was made, so nothing in "
            f"{self.root} can be trusted: rebuild it with `{self.command} ARGS=overwrite=true`.",
        )
        if self.recipe.get("format") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"The cache at {self.root} has format {self.recipe.get('format')}; this code reads format "
                f"{FORMAT_VERSION}. Rebuild it with `{self.command} ARGS=overwrite=true`."
            )
        self.layout = load_json(self.root / LAYOUT_FILE, self.repair(LAYOUT_FILE))
        try:
            self.index = read_index(self.root / INDEX_FILE)
            missing = [c for c in INDEX_COLUMNS if c not in self.index.columns]
            if missing:
                raise ValueError(f"no column {missing}")
            self.index[["n_frames", "array_part", "array_row", "frame_start"]].astype(np.int64)
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise CacheDamagedError(f"{self.root / INDEX_FILE} is damaged ({err}). {self.repair(INDEX_FILE)}") from None
        self.streams: list[str] = list(self.layout["frames"]["streams"])
        self._arrays: dict[int, np.ndarray] = {}
        self._frame_files: dict[int, Any] = {}
        self._table: Optional[np.ndarray] = None
        self.check_files()

    # --- the open-time check ------------------------------------------------------------------------------
    def repair(self, path: str = "") -> str:
        """The sentence that says how to repair damage in ``path`` (relative to the cache folder): run the prep
        again (it resumes, re-prepares only clips whose stored data is damaged, and rewrites index.csv,
        layout.json and the frame table from its journal); for a merged VGGSound cache, that shard's prep and
        the merge."""
        shard = re.match(r"shards/(\d+)-of-(\d+)/", path)
        merge = f"make prep-vggsound-merge OUT={self.root}"
        if shard:
            return (
                f"Run that shard's prep again (`{prep_command(self.dataset, self.root, f'SHARD={shard[1]}/{shard[2]}')}`"
                f"): it re-prepares only the damaged clips; then `{merge}`."
            )
        if (self.recipe.get("splits") or {}).get("shards"):
            return f"Run `{merge}` again: it rewrites index.csv, layout.json and frames/table.npy from the shards."
        return (
            f"Run `{self.command}` again: it resumes, re-prepares only the clips whose stored data is damaged, "
            "and rewrites index.csv, layout.json and frames/table.npy from its journal."
        )

    def _damaged(self, problem: str, path: str, ids: Sequence[str]) -> CacheDamagedError:
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        held = f" Clips affected: {len(ids)} ({shown})." if len(ids) else ""
        return CacheDamagedError(
            f"The {self.dataset} cache at {self.root} is damaged: {problem}{held} {self.repair(path)}"
        )

    def check_files(self) -> None:
        """Check, without decoding anything, that index.csv holds what recipe.json says the prep cached and that
        every usable row points inside storage files of the right size (a cut or missing .npy or .bin, a frame
        table that does not fit, rows deleted from the index). Costs a file-size look-up per storage file and a
        few vector operations over the index."""
        ok = self.index[self.index["status"] == OK]
        ids = ok["id"].to_numpy()
        recorded = self.recipe.get("index")
        if recorded is None and self.recipe.get("summary", {}).get("per_split"):  # caches from before "index"
            summary = self.recipe["summary"]
            recorded = {
                "rows": summary.get("found"),
                "ok": {s: summary["per_split"].get(s, {}).get("cached", 0) for s in SPLITS},
            }
        if recorded is not None:
            have = index_counts(self.index)
            wrong = [
                f"{have['ok'][s]} usable {s} clips where the prep cached {recorded['ok'].get(s, 0)}"
                for s in SPLITS
                if have["ok"][s] != recorded["ok"].get(s, 0)
            ]
            if recorded.get("rows") is not None and have["rows"] != recorded["rows"]:
                wrong.append(f"{have['rows']} rows where the prep wrote {recorded['rows']}")
            if wrong:
                raise self._damaged(
                    f"{INDEX_FILE} has {'; '.join(wrong)} (recipe.json's record): rows were deleted "
                    "or edited, and training would silently use other clips.",
                    INDEX_FILE,
                    [],
                )
        array = self.layout.get("array")
        if array:
            parts = list(array["parts"])
            part, row = ok["array_part"].to_numpy(np.int64), ok["array_row"].to_numpy(np.int64)
            outside = (part < 0) | (part >= len(parts))
            if outside.any():
                raise self._damaged(
                    f"{INDEX_FILE} points usable rows at array parts that {LAYOUT_FILE} does not list.",
                    INDEX_FILE,
                    list(ids[outside]),
                )
            for p, name in enumerate(parts):
                mine = part == p
                try:
                    shape = check_npy(self.root / name, "spectrograms", (None, *array["shape"]), array["dtype"])
                except CacheDamagedError as err:
                    raise self._damaged(str(err), name, list(ids[mine])) from None
                beyond = mine & (row >= shape[0])
                if beyond.any():
                    raise self._damaged(
                        f"{name} has {shape[0]} rows, but {INDEX_FILE} points usable clips at rows past its end.",
                        name,
                        list(ids[beyond]),
                    )
        if self.streams:
            self._check_frames(ok, ids)

    def _check_frames(self, ok: pd.DataFrame, ids: np.ndarray) -> None:
        table_path = self.layout["frames"].get("table", FRAME_TABLE_FILE)
        try:
            shape = check_npy(self.root / table_path, "the frame table", (None, 3), "int64")
            table = self._table = np.load(self.root / table_path)
        except (CacheDamagedError, OSError, ValueError) as err:
            raise self._damaged(str(err), table_path, []) from None
        parts = list(self.layout["frames"]["parts"])
        start = ok["frame_start"].to_numpy(np.int64)
        end = start + ok["n_frames"].to_numpy(np.int64) * len(self.streams)
        outside = (start < 0) | (end <= start) | (end > shape[0])
        if outside.any():
            raise self._damaged(
                f"{INDEX_FILE} points usable clips at frames outside {table_path} ({shape[0]} entries).",
                table_path,
                list(ids[outside]),
            )
        if len(table) and (table[:, 0].min() < 0 or table[:, 0].max() >= len(parts) or (table[:, 1:] < 0).any()):
            raise self._damaged(
                f"{table_path} names frame parts or byte ranges that {LAYOUT_FILE} does not hold.", table_path, []
            )
        stop = table[:, 1] + table[:, 2]
        order = np.argsort(start, kind="stable")
        for p, name in enumerate(parts):
            try:
                size = os.stat(self.root / name).st_size
            except OSError as err:
                size, problem = -1, f"{self.root / name} (JPEG frames) is missing or unreadable ({err.strerror})."
            else:
                problem = (
                    f"{self.root / name} (JPEG frames) is {size:,} bytes long, cut short of the frames stored in it."
                )
            cut = np.flatnonzero((table[:, 0] == p) & (stop > size))
            if len(cut):  # the clips whose frame range holds a cut frame
                clip = order[np.searchsorted(start[order], cut, side="right") - 1]
                clip = np.unique(clip[(cut >= start[clip]) & (cut < end[clip])])
                raise self._damaged(problem, name, list(ids[clip]))

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
                diffs += [
                    (f"{key}.{k}", have.get(k), want.get(k)) for k in AUDIO_PREP_DEFAULTS if have.get(k) != want.get(k)
                ]
            elif isinstance(have, dict) and isinstance(want, dict):
                diffs += [
                    (f"{key}.{k}", have.get(k), want.get(k))
                    for k in sorted(set(have) | set(want), key=str)
                    if _normal(have.get(k)) != _normal(want.get(k))
                ]
            elif _normal(have) != _normal(want):
                diffs.append((key, have, want))
        if diffs:
            lines = "\n".join(f"  {k}: cache has {_shown(k, h)}, config asks for {_shown(k, w)}" for k, h, w in diffs)
            wanted = dict.fromkeys(
                fix[k] if k in fix else fix[k.split(".")[0]] for k, _, _ in diffs if k in fix or k.split(".")[0] in fix
            )
            args = make_args(list(wanted))
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


def _shown(key: str, value: Any) -> str:
    option = key.rsplit(".", 1)[-1]
    if value is None and key.startswith("audio.") and option in AUDIO_PREP_DEFAULTS:
        return f"{AUDIO_PREP_DEFAULTS[option]!r} (the default, not recorded)"
    return repr(value)


def make_args(parts: list[str]) -> str:
    """Make-variable assignments with every ``ARGS=...`` joined into one (make keeps only the last ARGS)."""
    plain = [p for p in parts if not p.startswith("ARGS=")]
    extra = [p[len("ARGS=") :] for p in parts if p.startswith("ARGS=")]
    if len(extra) > 1:
        plain.append(f'ARGS="{" ".join(extra)}"')
    elif extra:
        plain.append(f"ARGS={extra[0]}")
    return " ".join(plain)


def _normal(value: Any) -> Any:
    """Compare recipes loosely where JSON loses types (tuples become lists, 1e-7 survives as a float)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 9)
    return value
