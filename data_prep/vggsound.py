"""VGGSound -> a cache of whole-clip log spectrograms (129 x 1,251, float16) and ten 1-fps frames per clip.

    python -m data_prep.vggsound raw_root=/path/to/vggsound csv=/path/to/vggsound.csv [shard=3/16]
    python -m data_prep.vggsound merge [out_root=...]

``vggsound.csv`` has no header: youtube_id, start_seconds (unpadded), label (quoted when it holds commas),
split (train/test). Clip files are found anywhere under ``raw_root`` as ``<ytid>_<start:06d>.mp4`` or with an
unpadded start (or a trailing end second). Labels: sorted names -> index. Most users miss some clips: the
summary reports coverage per split.

Sharding: ``shard=i/n`` (0 <= i < n) takes every n-th clip of the sorted list, starting at i, and writes a
complete cache to ``<out_root>/shards/<i>-of-<n>/``. Run the n shards anywhere (copy their folders into one
``shards/`` folder), then ``merge`` writes ``<out_root>``'s index, layout and frame table over the shards' files
(no data is copied). Every storage file stays under 2 GiB.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from data_prep.cache import Clip, _features, code_version
from data_prep.errors import PrepError, UsageError
from data_prep.ids import VideoFiles
from data_prep.pipeline import (
    CommonOptions,
    cli,
    default_out,
    existing_folder,
    frame_recipe,
    parse_args,
    process_av,
    run_prep,
)
from onthefly.data.base import CacheMissingError
from onthefly.data.cache import (
    FORMAT_VERSION,
    FRAME_TABLE_FILE,
    INDEX_FILE,
    LAYOUT_FILE,
    OK,
    RECIPE_FILE,
    SPLITS,
    CacheReader,
    audio_recipe,
    index_counts,
    prep_command,
    write_json,
)

DATASET = "vggsound"
SHARDS = "shards"


@dataclass
class Options(CommonOptions):
    csv: str = ""  # vggsound.csv (required)
    audio: str = "ogm_ge"  # ogm_ge: the whole-clip 129 x 1,251 log spectrogram | segment: the 10-s waveform (CVPR release: a 5-s segment's STFT at load time)
    downmix: str = "pyav"  # stereo to mono: pyav (FFmpeg, 0.707 each) | mean (librosa) | first (channel 0)
    shard: Optional[str] = None  # i/n: this machine's share


def read_csv(path: Path) -> tuple[list[tuple[str, int, str, str]], list[tuple[int, str]]]:
    """(ytid, start, label, split) rows, and (line, text) of rows that could not be read."""
    rows, bad = [], []
    if not path.is_file():
        raise PrepError(f"csv={path}: no such file (expected vggsound.csv: `ytid,start,label,train|test` rows)")
    with open(path, newline="", encoding="utf-8") as f:
        for line, fields in enumerate(csv.reader(f), start=1):
            if not fields:
                continue
            try:
                ytid, start, label, split = (x.strip() for x in fields)
                start_s = int(float(start))
                if split not in ("train", "test"):
                    raise ValueError(split)
            except ValueError:
                bad.append((line, ",".join(fields)))
                continue
            rows.append((ytid, start_s, label, split))
    return rows, bad


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"shard={text!r}: write it as i/n, e.g. 3/16") from None
    if not 0 <= i < n:
        raise UsageError(f"shard={text!r}: i must be in 0..{n - 1}")
    return i, n


def shard_dir(out: Path, i: int, n: int) -> Path:
    return out / SHARDS / f"{i}-of-{n}"


def list_clips(raw: Path, csv_path: Path) -> tuple[list[Clip], list[str]]:
    rows, bad = read_csv(csv_path)
    classes = sorted({label for _, _, label, _ in rows})
    files = VideoFiles([raw])
    clips, seen = [], set()
    for ytid, start, label, split in rows:
        clip_id = f"{ytid}_{start:06d}"
        if clip_id in seen:
            continue
        seen.add(clip_id)
        path = files.find(clip_id)
        clip = Clip(
            clip_id,
            label,
            split,
            {"video": str(path)} if path else {},
            source=path.relative_to(raw).as_posix() if path else "",
        )
        if path is None:
            clip.status, clip.reason = "missing", f"no video file for {clip_id} under {raw}"
        clips.append(clip)
    for line, text in bad:
        clips.append(
            Clip(
                f"csv-line-{line}",
                None,
                None,
                status="bad_row",
                reason=f"{csv_path.name} line {line} is not `ytid,start,label,train|test`: {text[:80]!r}",
            )
        )
    clips.sort(key=lambda c: c.id)
    return clips, classes


def prep(opts: Options) -> dict:
    if not opts.csv:
        raise UsageError("csv= is required: the path of vggsound.csv")
    raw, csv_path = existing_folder(opts.raw_root, "raw_root"), Path(opts.csv).expanduser()
    clips, classes = list_clips(raw, csv_path)
    out = Path(opts.out_root).expanduser() if opts.out_root else default_out(DATASET)
    shard = parse_shard(opts.shard)
    splits = {"mode": "csv", "csv": str(csv_path)}
    if shard:
        i, n = shard
        clips = clips[i::n]
        out = shard_dir(out, i, n)
        splits["shard"] = f"{i}/{n}"
    rec = audio_recipe(DATASET, opts.audio, opts.downmix)
    recipe = {"audio": rec, "frames": frame_recipe(opts), "min_audio_s": opts.min_audio_s}
    summary = run_prep(
        dataset=DATASET,
        clips=clips,
        out_root=out,
        recipe=recipe,
        streams=["visual"],
        array={"shape": rec["shape"], "dtype": rec["dtype"]},
        classes=classes,
        splits=splits,
        work=process_av,
        opts=opts,
        raw_root=raw,
        expected=f"`ytid,start,label,train|test` rows in csv={csv_path}"
        f"{f' (shard {opts.shard})' if shard else ''}, naming <ytid>_<start:06d>.mp4 (or "
        f"<ytid>_<start>.mp4) files anywhere under raw_root={raw}",
    )
    if shard:
        print(
            f"  shard {shard[0]}/{shard[1]} done; when all {shard[1]} are in {out.parent}, run "
            f"`make prep-vggsound-merge OUT={out.parent.parent}`"
        )
    return summary


def merge(out: Path, allow_partial: bool = False) -> dict:
    """Write ``out``'s index.csv, layout.json, frame table and recipe.json over the caches in ``out/shards``."""
    shards = sorted((out / SHARDS).glob("*-of-*"), key=lambda p: int(p.name.split("-of-")[0]))
    if not shards:
        raise PrepError(f"no shard caches in {out / SHARDS}: run `make prep-vggsound ... SHARD=i/n OUT={out}` first")
    counts = {int(p.name.split("-of-")[1]) for p in shards}
    if len(counts) != 1:
        raise PrepError(f"{out / SHARDS} mixes shard counts {sorted(counts)}: keep one set")
    n = counts.pop()
    present = {int(p.name.split("-of-")[0]) for p in shards if (p / INDEX_FILE).exists()}
    absent = sorted(set(range(n)) - present)
    if absent and not allow_partial:
        raise PrepError(
            f"shards {absent} of {n} are missing or unfinished in {out / SHARDS}: run them "
            "(`make prep-vggsound ... SHARD=i/n`), or merge what is there with allow_partial=true"
        )
    indexes, tables, array_parts, frame_parts = [], [], [], []
    first = None
    for p in shards:
        if int(p.name.split("-of-")[0]) not in present:
            continue
        i = int(p.name.split("-of-")[0])
        try:  # opening checks the shard's files (a cut part is named with the command that redoes its clips)
            shard = CacheReader(p, DATASET, command=prep_command(DATASET, out, f"SHARD={i}/{n}"))
        except CacheMissingError as err:
            raise PrepError(f"shard {i}/{n}: {err}") from None
        recipe, layout = shard.recipe, shard.layout
        if first is None:
            first, first_layout = recipe, layout
        elif _features(recipe) != _features(first) or recipe["classes"] != first["classes"]:
            raise PrepError(
                f"{p} was made with another recipe or csv than {shards[0]}: re-run it with the same options"
            )
        index, table = shard.index.copy(), shard.frame_table()
        rel = p.relative_to(out).as_posix()
        ok = index["status"] == OK
        index.loc[ok, "array_part"] += len(array_parts)
        index.loc[ok & (index["frame_start"] >= 0), "frame_start"] += sum(len(t) for t in tables)
        table = table.copy()
        table[:, 0] += len(frame_parts)
        array_parts += [f"{rel}/{q}" for q in layout["array"]["parts"]]
        frame_parts += [f"{rel}/{q}" for q in layout["frames"]["parts"]]
        indexes.append(index)
        tables.append(table)
    index = pd.concat(indexes, ignore_index=True)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    np.save(out / FRAME_TABLE_FILE, np.concatenate(tables) if tables else np.zeros((0, 3), np.int64))
    layout = dict(first_layout)
    layout["array"]["parts"], layout["frames"]["parts"] = array_parts, frame_parts
    write_json(out / LAYOUT_FILE, layout)
    index.to_csv(out / INDEX_FILE, index=False)
    per_split = {
        s: {
            "listed": int((index["split"] == s).sum()),
            "cached": int(((index["split"] == s) & (index["status"] == OK)).sum()),
        }
        for s in SPLITS
    }
    summary = {
        "dataset": DATASET,
        "out_root": str(out),
        "shards": f"{len(present)} of {n}",
        "found": int(len(index)),
        "cached": int((index["status"] == OK).sum()),
        "skipped": index.loc[index["status"] != OK, "status"].value_counts().to_dict(),
        "per_split": per_split,
    }
    doc = dict(first, format=FORMAT_VERSION, code_version=code_version(), summary=summary, index=index_counts(index))
    doc["splits"] = {k: v for k, v in doc["splits"].items() if k != "shard"}
    doc["splits"]["shards"] = n
    write_json(out / RECIPE_FILE, doc)
    print(f"vggsound merge: {summary['shards']} shards, {summary['found']} clips, {summary['cached']} cached -> {out}")
    for s, c in per_split.items():
        if c["listed"]:
            share = 100 * c["cached"] / c["listed"]
            print(f"  {s:<6} {c['cached']:>7} of {c['listed']:>7} listed ({share:.1f}% coverage)")
    if summary["cached"] == 0:
        raise PrepError(f"vggsound merge: the shards in {out / SHARDS} hold no cached clip; see their index.csv files")
    return summary


@dataclass
class MergeOptions:
    out_root: Optional[str] = None
    allow_partial: bool = False


def run(argv: list[str]) -> dict:
    """The prep (or, with ``merge`` first, the merge) of ``argv``: its summary, or a PrepError."""
    if argv and argv[0] == "merge":
        opts = parse_args(argv[1:], MergeOptions, "python -m data_prep.vggsound merge [out_root=...]")
        return merge(Path(opts.out_root).expanduser() if opts.out_root else default_out(DATASET), opts.allow_partial)
    usage = "python -m data_prep.vggsound raw_root=/path/to/vggsound csv=/path/to/vggsound.csv [shard=i/n]"
    return prep(parse_args(argv, Options, usage))


def main(argv=None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
