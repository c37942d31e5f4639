"""CMU-MOSI: a released feature pickle -> the cache that :mod:`onthefly.data.mosi` reads.

    python -m data_prep.mosi pkl=/path/to/mosi_data.pkl [out_root=...] [overwrite=true]

Unpickling runs code stored in the file: only the file named by ``pkl=`` is ever loaded, so give only a pickle
from a source you trust. Two releases are told apart by their structure (both: a dict of splits ``train``,
``valid``, ``test``; ``valid`` becomes our ``val``, ``vision`` our ``visual``):

* MulT (multimodal-transformer): ``mosi_data.pkl`` (aligned: 50 steps everywhere) and ``mosi_data_noalign.pkl``
  (each modality its own length). Per split: ``text``, ``audio``, ``vision`` [N, T, D], ``labels`` [N, 1, 1],
  ``id`` [N] or [N, 3] (video, start, end). No lengths.
* MMSA: ``aligned_50.pkl`` and ``unaligned_50.pkl``. Per split: ``text`` [N, 50, 768] (BERT), optional
  ``text_bert`` [N, 3, 50] (token ids, attention mask, segments), ``audio``, ``vision``, ``regression_labels``
  [N], ``id`` [N], optional ``audio_lengths`` / ``vision_lengths`` [N].

Feature sizes are read from the arrays. Non-finite values (-inf in the audio, NaN) become 0 and are counted.
Lengths: given ones are used (``*_lengths``; the text's from the ``text_bert`` attention mask); otherwise a
sequence's valid span runs from its first to its last time step that is not all zeros. Which end the MulT
releases pad is not documented (MMSA pads at the end), so the span is found from both ends and every sequence
is stored left-aligned: steps 0 .. length-1 valid, zeros after. A segment whose label is not a finite number is
left out and listed in index.csv with its reason.

Re-running with an unchanged pickle (same size and modification time) does nothing; a cache made from another
file is replaced only with ``overwrite=true``.
"""

from __future__ import annotations

import pickle
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import numpy as np
import pandas as pd

from data_prep.cache import code_version
from data_prep.errors import PrepError, UsageError
from data_prep.pipeline import cli, default_out, parse_args
from onthefly.data.base import CacheMissingError
from onthefly.data.cache import INDEX_FILE, OK, RECIPE_FILE, SPLITS, read_json, write_json
from onthefly.data.mosi import DATASET, FORMAT_VERSION, MODALITIES, MOSI, array_path, label_of, lengths_path, score_path

USAGE = "python -m data_prep.mosi pkl=/path/to/mosi_data.pkl [out_root=...] [overwrite=true]"
SOURCE_SPLITS = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}  # ours -> the pickle's names
SOURCE_KEYS = {"text": "text", "audio": "audio", "visual": "vision"}  # ours -> the pickle's names
LABEL_KEYS = {"mult": "labels", "mmsa": "regression_labels"}
FORMAT_NAMES = {"mult": "MulT (multimodal-transformer)", "mmsa": "MMSA"}
FORMATS_HELP = """The two supported pickles, each a dict {"train", "valid", "test"} of dicts:
  MulT  mosi_data.pkl / mosi_data_noalign.pkl: "text", "audio", "vision" [N, T, D], "labels" [N, 1, 1], "id"
  MMSA  aligned_50.pkl / unaligned_50.pkl: "text" [N, 50, 768], "audio", "vision" [N, T, D],
        "regression_labels" [N], "id" [N], optional "text_bert" [N, 3, 50], "audio_lengths", "vision_lengths" [N]"""


@dataclass
class Options:
    pkl: str = ""  # the MulT or MMSA pickle (required; the only file loaded)
    out_root: Optional[str] = None  # default: $ONTHEFLY_DATA/mosi, or data/mosi
    overwrite: bool = False  # replace a cache made from another file


def fail(message: str) -> NoReturn:
    raise PrepError(f"data_prep.mosi: {message}")


def load_pickle(path: Path) -> Any:
    """Unpickle ``path`` (Python 2 pickles too: their byte strings are read as latin-1 on a second try)."""
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except UnicodeDecodeError:
            f.seek(0)
            return pickle.load(f, encoding="latin1")


def source_info(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(st.st_mtime)),
    }


# --- reading the pickle -------------------------------------------------------------------------------------
def source_splits(data: Any) -> dict[str, tuple[str, Mapping]]:
    """Our split -> (the pickle's name for it, its dict)."""
    if not isinstance(data, Mapping):
        fail(f"the pickle holds a {type(data).__name__}, not a dict of splits.\n{FORMATS_HELP}")
    out = {}
    for split, names in SOURCE_SPLITS.items():
        name = next((n for n in names if n in data), None)
        if name is None:
            fail(f"the pickle has no split {names[0]!r} (its keys: {sorted(map(str, data))}).\n{FORMATS_HELP}")
        if not isinstance(data[name], Mapping):
            fail(f"split {name!r} is a {type(data[name]).__name__}, not a dict of arrays.\n{FORMATS_HELP}")
        out[split] = (name, data[name])
    return out


def detect_format(splits: dict[str, tuple[str, Mapping]]) -> str:
    name, first = splits["train"]
    if "regression_labels" in first:
        return "mmsa"
    if "labels" in first:
        return "mult"
    fail(
        f"split {name!r} has neither 'labels' (MulT) nor 'regression_labels' (MMSA); its keys: "
        f"{sorted(map(str, first))}.\n{FORMATS_HELP}"
    )


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace").strip()
    return str(value).strip()


def segment_ids(raw: Any, n: int, split: str) -> list[str]:
    """One string per segment: bytes decoded, the parts of a [video, start, end] row joined with '_'."""
    if raw is None:
        return [f"{split}-{i}" for i in range(n)]
    ids = []
    for i, entry in enumerate(raw):
        parts = np.asarray(entry, dtype=object).ravel().tolist()
        text = "_".join(p for p in map(_text, parts) if p)
        ids.append(text or f"{split}-{i}")
    return ids


def clean(x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """float32 copy with NaN and +-inf replaced by 0, and how many of each there were."""
    x = np.array(x, dtype=np.float32)
    counts = {"nan": int(np.isnan(x).sum()), "+inf": int(np.isposinf(x).sum()), "-inf": int(np.isneginf(x).sum())}
    if any(counts.values()):
        x[~np.isfinite(x)] = 0.0
    return x, counts


def valid_span(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each sequence's span from its first to its last step that is not all zeros
    (length 1 at step 0 for an all-zero sequence)."""
    nonzero = np.any(x != 0, axis=2)
    has = nonzero.any(axis=1)
    first = np.where(has, nonzero.argmax(axis=1), 0)
    last = np.where(has, x.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1), 0)
    return first.astype(np.int64), (last - first + 1).astype(np.int64)


def _given_lengths(values: Any, n: int, where: str) -> np.ndarray:
    lengths = np.asarray(values).reshape(-1)
    if len(lengths) != n:
        fail(f"{where} has {len(lengths)} entries for {n} segments")
    return lengths.astype(np.int64)


def read_split(split: str, name: str, d: Mapping, fmt: str) -> dict[str, Any]:
    """Check one split of the pickle and turn it into cleaned, left-aligned arrays with lengths."""
    label_key = LABEL_KEYS[fmt]
    for key in [*SOURCE_KEYS.values(), label_key]:
        if key not in d:
            fail(
                f"split {name!r} has no {key!r} array (its keys: {sorted(map(str, d))}); this looks like the "
                f"{FORMAT_NAMES[fmt]} release, whose splits all have {key!r}.\n{FORMATS_HELP}"
            )
    labels = np.asarray(d[label_key], dtype=np.float64)
    n = len(labels)
    labels = labels.reshape(n, -1)
    if labels.shape[1] != 1:
        fail(f"split {name!r}: {label_key!r} has shape {np.shape(d[label_key])}, expected one score per segment")
    sizes = {label_key: n}
    out: dict[str, Any] = {
        "score": labels[:, 0],
        "features": {},
        "lengths": {},
        "length_source": {},
        "moved": {},
        "replaced": {},
    }
    for key in SOURCE_KEYS.values():
        x = np.asarray(d[key])
        if x.ndim != 3:
            fail(f"split {name!r}: {key!r} has shape {x.shape}; expected [segments, time steps, features]")
        sizes[key] = x.shape[0]
    if len(set(sizes.values())) > 1:
        fail(f"split {name!r}: the arrays disagree on the number of segments: {sizes}")
    if "id" in d and len(d["id"]) != n:
        fail(f"split {name!r}: 'id' has {len(d['id'])} entries for {n} segments")
    out["ids"] = segment_ids(d.get("id"), n, split)

    for m, key in SOURCE_KEYS.items():
        x, out["replaced"][m] = clean(d[key])
        steps = x.shape[1]
        given, source = None, "inferred (first to last non-zero step)"
        if m in ("audio", "visual") and f"{key}_lengths" in d:
            given, source = (
                _given_lengths(d[f"{key}_lengths"], n, f"split {name!r}: '{key}_lengths'"),
                f"given ({key}_lengths)",
            )
        elif m == "text" and "text_bert" in d:
            bert = np.asarray(d["text_bert"])
            if bert.ndim == 3 and bert.shape[:2] == (n, 3):
                given, source = bert[:, 1].sum(axis=1).astype(np.int64), "given (text_bert attention mask)"
            else:
                print(
                    f"  note: split {name!r}: 'text_bert' has shape {bert.shape}, not [{n}, 3, steps]; "
                    "text lengths are inferred instead"
                )
        moved = 0
        if given is None:
            start, lengths = valid_span(x)
            for i in np.flatnonzero(start > 0):  # padded at the front: bring the span to step 0
                span = x[i, start[i] : start[i] + lengths[i]].copy()
                x[i] = 0.0
                x[i, : lengths[i]] = span
                moved += 1
        else:
            lengths = np.clip(given, 1, steps)
        for i in np.flatnonzero(lengths < steps):  # padding is zeros, whatever the pickle held there
            x[i, lengths[i] :] = 0.0
        out["features"][m], out["lengths"][m] = x, lengths
        out["length_source"][m], out["moved"][m] = source, moved
    return out


# --- the cache ----------------------------------------------------------------------------------------------
def _same_source(old: dict[str, Any], src: dict[str, Any]) -> bool:
    there = old.get("source") or {}
    return (
        old.get("dataset") == DATASET
        and old.get("format_version") == FORMAT_VERSION
        and there.get("size") == src["size"]
        and there.get("mtime_ns") == src["mtime_ns"]
    )


def _wipe(out: Path) -> None:
    """Remove what this prep writes (and nothing else in the folder)."""
    (out / RECIPE_FILE).unlink(missing_ok=True)
    (out / INDEX_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)


def write_cache(
    out: Path, fmt: str, src: dict[str, Any], parts: dict[str, dict[str, Any]], names: dict[str, str]
) -> dict[str, Any]:
    """Arrays and index.csv first, recipe.json last (its presence marks a finished cache)."""
    _wipe(out)
    rows, seen = [], set()
    counts = {}
    for split in SPLITS:
        p = parts[split]
        ok = np.isfinite(p["score"])
        (out / split).mkdir(parents=True, exist_ok=True)
        for m in MODALITIES:
            np.save(array_path(out, split, m), p["features"][m][ok])
            np.save(lengths_path(out, split, m), p["lengths"][m][ok])
        np.save(score_path(out, split), p["score"][ok].astype(np.float32))
        row = 0
        for i, (seg, score) in enumerate(zip(p["ids"], p["score"])):
            unique, k = seg, 1
            while unique in seen:  # ids repeat in some releases: keep index.csv's ids unique
                k += 1
                unique = f"{seg}#{k}"
            seen.add(unique)
            entry = {
                "id": unique,
                "split": split,
                "label": -1,
                "score": round(float(score), 6),
                **{f"len_{m}": int(p["lengths"][m][i]) for m in MODALITIES},
                "row": -1,
                "source_row": i,
                "status": OK,
                "reason": "",
            }
            if ok[i]:
                entry.update(label=label_of(score), row=row)
                row += 1
            else:
                entry.update(status="bad_label", reason=f"the score in {names[split]!r} row {i} is {score}")
            rows.append(entry)
        counts[split] = {"listed": len(ok), "cached": int(ok.sum()), "skipped": int((~ok).sum())}
    pd.DataFrame(rows).to_csv(out / INDEX_FILE, index=False)

    first = parts["train"]
    steps = {m: int(first["features"][m].shape[1]) for m in MODALITIES}
    replaced = {
        m: {k: sum(parts[s]["replaced"][m][k] for s in SPLITS) for k in ("nan", "+inf", "-inf")} for m in MODALITIES
    }
    recipe = {
        "dataset": DATASET,
        "format_version": FORMAT_VERSION,
        "code_version": code_version(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source_format": fmt,
        "aligned": len(set(steps.values())) == 1,
        "source": src,
        "split_names": {s: names[s] for s in SPLITS},
        "dims": {m: int(first["features"][m].shape[2]) for m in MODALITIES},
        "max_len": steps,
        "lengths": {m: first["length_source"][m] for m in MODALITIES},
        "moved_to_front": {m: sum(parts[s]["moved"][m] for s in SPLITS) for m in MODALITIES},
        "splits": {s: counts[s]["cached"] for s in SPLITS},
        "replaced_nonfinite": replaced,
        "counts": counts,
    }
    return recipe


def format_summary(s: dict[str, Any]) -> str:
    dims = ", ".join(f"{m} {s['dims'][m]}" for m in MODALITIES)
    steps = " / ".join(str(s["max_len"][m]) for m in MODALITIES)
    lines = [
        f"{DATASET}: {FORMAT_NAMES[s['source_format']]} pickle, {'aligned' if s['aligned'] else 'unaligned'}"
        f" -> {s['out_root']}  ({s['seconds']:.1f} s)",
        f"  features  {dims}   (time steps {steps})",
        f"  {'split':<8} {'listed':>7} {'cached':>7} {'skipped':>8}",
    ]
    for split, c in s["counts"].items():
        lines.append(f"  {split:<8} {c['listed']:>7} {c['cached']:>7} {c['skipped']:>8}")
    replaced = {m: {k: v for k, v in r.items() if v} for m, r in s["replaced_nonfinite"].items()}
    text = "; ".join(
        f"{m} {sum(r.values())} ({', '.join(f'{k} {v}' for k, v in r.items())})" for m, r in replaced.items() if r
    )
    lines.append(f"  non-finite values set to 0: {text or 'none'}")
    lines.append("  lengths: " + "; ".join(f"{m} {s['lengths'][m]}" for m in MODALITIES))
    moved = {m: v for m, v in s["moved_to_front"].items() if v}
    if moved:
        lines.append("  front-padded sequences stored left-aligned: " + ", ".join(f"{m} {v}" for m, v in moved.items()))
    lines.append(f"  index (a status and reason per segment): {Path(s['out_root']) / INDEX_FILE}")
    return "\n".join(lines)


def run(argv: Sequence[str]) -> dict[str, Any]:
    """The prep of ``argv`` (key=value options): its summary, or a PrepError."""
    opts = parse_args(argv, Options, USAGE)
    if not opts.pkl:
        raise UsageError(f"data_prep.mosi: pkl= is required\nusage: {USAGE}")
    path = Path(opts.pkl).expanduser()
    if not path.is_file():
        fail(f"pkl={path}: no such file")
    out = Path(opts.out_root).expanduser() if opts.out_root else default_out(DATASET)
    src = source_info(path)
    t0 = time.time()
    if (out / RECIPE_FILE).exists():
        try:
            old = read_json(out / RECIPE_FILE)
        except (OSError, ValueError) as err:
            if not opts.overwrite:
                fail(
                    f"{out / RECIPE_FILE} is damaged ({err}): it records which file the cache in {out} was made "
                    "from. Pass overwrite=true (ARGS=overwrite=true) to rebuild it, or pick another out_root= (OUT=)."
                )
            old = {}
        if _same_source(old, src) and not opts.overwrite:
            try:
                MOSI(root=str(out)).open()  # the open-time check: files of the sizes the recipe says
            except CacheMissingError as err:
                print(f"{DATASET}: {out} was prepared from {path}, but is damaged; rebuilding it\n  ({err})")
            else:
                print(
                    f"{DATASET}: {out} was already prepared from {path} (same size and modification time): "
                    "nothing to do (overwrite=true rebuilds it)"
                )
                return {**old.get("summary", {}), "up_to_date": True}
        elif not opts.overwrite:
            there = old.get("source") or {}
            fail(
                f"{out} holds a {old.get('dataset')} cache made from another file:\n"
                f"  there: {there.get('path')} ({there.get('size')} bytes, modified {there.get('mtime')})\n"
                f"  asked: {src['path']} ({src['size']} bytes, modified {src['mtime']})\n"
                "Pick another out_root= (OUT=), or pass overwrite=true (ARGS=overwrite=true) to replace it."
            )
    print(
        f"{DATASET}: loading {path} ({src['size'] / 2**20:.1f} MiB; unpickling runs code from the file, so "
        "load only files you trust)"
    )
    try:
        data = load_pickle(path)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as err:
        fail(f"{path} could not be unpickled ({type(err).__name__}: {err}).\n{FORMATS_HELP}")
    found = source_splits(data)
    fmt = detect_format(found)
    print(f"  {FORMAT_NAMES[fmt]} release; splits {', '.join(f'{n} -> {s}' for s, (n, _) in found.items())}")
    parts = {}
    for split, (name, d) in found.items():
        print(f"  reading {name}: cleaning features, finding lengths")
        parts[split] = read_split(split, name, d, fmt)
    for m in MODALITIES:
        dims = {s: parts[s]["features"][m].shape[2] for s in SPLITS}
        if len(set(dims.values())) > 1:
            fail(f"the splits disagree on the {SOURCE_KEYS[m]!r} feature size: {dims}")
    usable = {s: int(np.isfinite(parts[s]["score"]).sum()) for s in SPLITS}
    empty = [found[s][0] for s in SPLITS if usable[s] == 0]
    if empty:  # training needs every split: nothing is written
        fail(
            f"{path}: split{'s' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} of the pickle "
            f"hold{'' if len(empty) > 1 else 's'} no segment with a finite score (usable per split: {usable}); "
            f"expected {FORMAT_NAMES[fmt]} arrays with one score per segment.\n{FORMATS_HELP}"
        )
    out.mkdir(parents=True, exist_ok=True)
    print(f"  writing {out}")
    recipe = write_cache(out, fmt, src, parts, {s: n for s, (n, _) in found.items()})
    summary = {
        key: recipe[key]
        for key in (
            "source_format",
            "aligned",
            "dims",
            "max_len",
            "lengths",
            "moved_to_front",
            "splits",
            "replaced_nonfinite",
            "counts",
        )
    }
    summary.update(dataset=DATASET, out_root=str(out), pkl=str(path), seconds=round(time.time() - t0, 2))
    recipe["summary"] = summary
    write_json(out / RECIPE_FILE, recipe)
    print(format_summary(summary))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
