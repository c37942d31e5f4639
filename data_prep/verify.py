"""``make verify-cache DATASET=<name> [ROOT=path]``: read and decode everything a cache holds, and name each bad clip.

    python -m data_prep.verify dataset=cremad [root=...] [mark=true] [progress=true]

Opening a cache (what training does) already checks every file's size against the index, without decoding.
This goes further, for users who want it: every spectrogram row is read and must be finite, every JPEG must
decode, and both must still have the CRC-32 the prep recorded in its journal (bytes garbled in place, which no
size check and not every decoder notices). CMU-MOSI: every feature finite, every length within its sequence,
every score finite. AVQA: the question tables (token ids inside the vocabulary), then its media cache.

``mark=true`` records the bad clips as ``damaged`` in the prep's journal, so that running the prep command again
re-prepares exactly those clips (the summary prints that command). Exit code 0: nothing bad; 1: something bad.
"""

import io
import json
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from data_prep.cache import DAMAGED, read_journal
from data_prep.errors import PrepError, UsageError
from data_prep.pipeline import cli, default_out, parse_args
from onthefly.data.avqa import AVQA, media_cache_path
from onthefly.data.base import CacheMissingError
from onthefly.data.cache import JOURNAL_FILE, PREP_COMMANDS, SPLITS, CacheReader
from onthefly.data.mosi import MOSI, MOSISplit
from onthefly.progress import bar as progress_bar

USAGE = "python -m data_prep.verify dataset=<name> [root=path] [mark=true]"
CLIP_CACHES = ("cremad", "kinetics_sounds", "vggsound", "ucf101")


@dataclass
class Options:
    dataset: str = ""  # cremad | kinetics_sounds | vggsound | ucf101 | mosi | avqa | avqa_music (required)
    root: Optional[str] = None  # the cache folder (default: $ONTHEFLY_DATA/<dataset>, or data/<dataset>)
    mark: bool = False  # record the bad clips as damaged in the prep's journal (the next prep redoes them)
    progress: bool = True


def journals(root: Path) -> dict[str, tuple[dict, Path]]:
    """Each clip's last journal entry and the journal that holds it: the cache's own and, for a merged VGGSound
    cache, its shards'. Empty for a cache copied without its journal (then no CRC is compared)."""
    found: dict[str, tuple[dict, Path]] = {}
    for path in [root / JOURNAL_FILE, *sorted(root.glob(f"shards/*/{JOURNAL_FILE}"))]:
        found.update({clip_id: (entry, path) for clip_id, entry in read_journal(path).items()})
    return found


def check_clip(reader: CacheReader, row, entry: Optional[dict]) -> list[str]:
    """What is wrong with one usable clip of ``reader`` (an index row): unreadable or non-finite spectrogram,
    a JPEG that does not decode, bytes whose CRC-32 differs from the one the prep recorded."""
    problems = []
    if reader.array_shape is not None:
        part = reader.layout["array"]["parts"][row.array_part]
        try:
            x = reader.array(int(row.array_part), int(row.array_row))
            bad = int(x.size - np.isfinite(x).sum())
            if bad:
                problems.append(f"{bad} non-finite values in its spectrogram ({part} row {row.array_row})")
            if entry is not None and "array_crc" in entry and zlib.crc32(np.ascontiguousarray(x)) != entry["array_crc"]:
                problems.append(
                    f"its spectrogram's bytes changed since the prep wrote them ({part} row {row.array_row})"
                )
        except (OSError, ValueError) as err:
            problems.append(f"its spectrogram cannot be read ({part}: {err})")
    crcs = entry.get("frame_crcs") if entry is not None else None
    n_streams = len(reader.streams)
    for k in range(int(row.n_frames) * n_streams):
        table_row = int(row.frame_start) + k
        where = (
            f"frame {k // n_streams} ({reader.streams[k % n_streams]}) in "
            f"{reader.layout['frames']['parts'][int(reader.frame_table()[table_row, 0])]}"
        )
        data = reader.jpeg(table_row)
        if crcs is not None and k < len(crcs) and zlib.crc32(data) != crcs[k]:
            problems.append(f"{where}: bytes changed since the prep wrote them")
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for broken image data
            problems.append(f"{where} does not decode ({err})")
    return problems


def verify_clips(reader: CacheReader, progress: bool) -> tuple[dict[str, list[str]], dict]:
    """{clip id: problems} over every usable clip of a clip cache, and the journal entries used."""
    entries = journals(reader.root)
    rows = reader.ok_rows()
    bad = {}
    for row in progress_bar(
        rows.itertuples(index=False), total=len(rows), desc=f"verify {reader.root}", unit="clip", enabled=progress
    ):
        problems = check_clip(reader, row, entries.get(row.id, (None, None))[0])
        if problems:
            bad[row.id] = problems
    return bad, entries


def mark(bad: dict[str, list[str]], entries: dict[str, tuple[dict, Path]]) -> list[str]:
    """Append a ``damaged`` entry for each bad clip to the journal that holds it; return the ids it could not
    mark (no journal)."""
    lines: dict[Path, list[str]] = {}
    unmarked = []
    for clip_id, problems in bad.items():
        entry, path = entries.get(clip_id, (None, None))
        if entry is None:
            unmarked.append(clip_id)
            continue
        lines.setdefault(path, []).append(
            json.dumps(
                {
                    "id": clip_id,
                    "status": DAMAGED,
                    "reason": "make verify-cache: " + "; ".join(problems)[:500],
                    "duration": entry.get("duration", 0.0),
                    "n_frames": 0,
                    "sig": entry.get("sig"),
                }
            )
        )
    for path, text in lines.items():
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n".join(text) + "\n")
    return unmarked


def verify_mosi(root: Path, progress: bool) -> dict[str, list[str]]:
    """{split/modality: problems}: non-finite features, lengths outside their sequences, non-finite scores."""
    MOSI(root=str(root)).open()
    bad: dict[str, list[str]] = {}
    for split in progress_bar(SPLITS, desc=f"verify {root}", enabled=progress):
        part = MOSISplit(root, split, ["text", "audio", "visual"])
        if not np.isfinite(part.scores).all():
            bad.setdefault(split, []).append(f"{int((~np.isfinite(part.scores)).sum())} non-finite scores")
        for m in part.modalities:
            arr = part.array(m)
            nonfinite = sum(
                int(arr[i : i + 256].size - np.isfinite(arr[i : i + 256]).sum()) for i in range(0, len(arr), 256)
            )
            if nonfinite:
                bad.setdefault(f"{split}/{m}", []).append(f"{nonfinite} non-finite feature values")
            lengths = part.lengths[m]
            if len(lengths) and (lengths.min() < 0 or lengths.max() > arr.shape[1]):
                bad.setdefault(f"{split}/{m}", []).append(f"lengths outside 0..{arr.shape[1]}")
    return bad


def run(argv: list[str]) -> dict:
    opts = parse_args(argv, Options, USAGE)
    known = sorted(PREP_COMMANDS)
    if opts.dataset not in known:
        raise UsageError(f"dataset={opts.dataset!r}: one of {', '.join(known)}\nusage: {USAGE}")
    root = Path(opts.root).expanduser() if opts.root else default_out(opts.dataset)
    t0 = time.time()
    try:
        if opts.dataset == "mosi":
            bad, reader = verify_mosi(root, opts.progress), None
        else:
            if opts.dataset in CLIP_CACHES:
                reader = CacheReader(root, opts.dataset)
            else:  # AVQA: the question tables, then the media cache
                dataset = AVQA(root=str(root))
                recipe = dataset._read_recipe()
                dataset._read_tables(recipe)
                reader = dataset.open_media(recipe)
                print(
                    f"{opts.dataset}: question tables of {root} are intact; media cache {media_cache_path(root, recipe)}"
                )
            bad, entries = verify_clips(reader, opts.progress)
    except CacheMissingError as err:  # the open-time check failed: that is the finding
        raise PrepError(f"verify {opts.dataset}: {err}") from None
    checked = "segments" if reader is None else f"{len(reader.ok_rows())} clips"
    print(f"verify {opts.dataset}: {checked} of {root} read in {time.time() - t0:.1f} s: {len(bad) or 'nothing'} bad")
    for key, problems in bad.items():
        print(f"  {key}: " + "; ".join(problems))
    if not bad:
        return {"bad": {}}
    if reader is None:
        fix = f"Rebuild the cache: `{PREP_COMMANDS['mosi']} OUT={root} ARGS=overwrite=true`."
    elif opts.mark:
        unmarked = mark(bad, entries)
        fix = (
            f"Marked {len(bad) - len(unmarked)} clips as damaged in the prep's journal: run "
            f"`{reader.command}` again to re-prepare them"
            + (
                " (for a merged VGGSound cache: each shard's prep, then the merge)"
                if reader.recipe.get("splits", {}).get("shards")
                else ""
            )
            + "."
        )
        if unmarked:
            fix += f" {len(unmarked)} have no journal entry (a copied cache?): rebuild it with ARGS=overwrite=true."
    else:
        fix = (
            f"To re-prepare exactly these clips: `make verify-cache DATASET={opts.dataset} ROOT={root} "
            f"ARGS=mark=true`, then run `{reader.command}` again."
        )
    raise PrepError(f"verify {opts.dataset}: {len(bad)} bad in {root}. {fix}")


def main(argv=None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
