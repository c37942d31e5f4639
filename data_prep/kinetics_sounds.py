"""Kinetics-Sounds from a Kinetics-400 download -> a cache of kaldi-fbank audio and ten 1-fps frames per clip.

    python -m data_prep.kinetics_sounds raw_root=/path/to/kinetics400 [lists=/path/to/lists] [audio=fbank|stft]

Raw: ``{train,val,test}/<ytid>_<start:06d>_<end:06d>.mp4`` (flat, or in per-class folders) and
``annotations/{train,val,test}.csv`` (label, youtube_id, time_start, time_end, split). Without ``lists`` the
31 classes' clips come from the Kinetics-400 annotations: train -> train, val -> test (the cache has no val
split; readers hold out part of train). With ``lists``: a folder of train / val / test files (``.txt`` or
``.csv``, named ``train.txt``, ``my_train.txt``, ``test_list.csv`` ...: see :func:`split_of`) of
``<id>,10,<label>`` lines, the label a class name or its number in :data:`CLASSES` (the CVPR 2022 repository's
``data/KineticSound/my_train.txt`` and ``my_test.txt``), or a JSON database (``{"database": {id: {"subset":
"training" | "validation" | "testing", "label": ...}}}``, the journal repository's ``code/dataset/KS_train_val.json``).
An id may be ``<ytid>_<start:06d>_<end:06d>`` or ``<ytid>_<start>`` (the lab's test lists): both resolve to the
same file. A clip listed in two splits is refused.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from data_prep.cache import Clip
from data_prep.errors import PrepError
from data_prep.ids import VideoFiles
from data_prep.pipeline import CommonOptions, cli, prep_audio_visual

DATASET = "kinetics_sounds"
# "Look, Listen and Learn"'s 34 classes minus typing, fingerpicking and patting, in Kinetics-400 names;
# the label index is this (alphabetical) order.
CLASSES = [
    "blowing_nose",
    "blowing_out_candles",
    "bowling",
    "chopping_wood",
    "dribbling_basketball",
    "laughing",
    "mowing_lawn",
    "playing_accordion",
    "playing_bagpipes",
    "playing_bass_guitar",
    "playing_clarinet",
    "playing_drums",
    "playing_guitar",
    "playing_harmonica",
    "playing_keyboard",
    "playing_organ",
    "playing_piano",
    "playing_saxophone",
    "playing_trombone",
    "playing_trumpet",
    "playing_violin",
    "playing_xylophone",
    "ripping_paper",
    "shoveling_snow",
    "shuffling_cards",
    "singing",
    "stomping_grapes",
    "tap_dancing",
    "tapping_guitar",
    "tapping_pen",
    "tickling",
]
SUBSETS = {"training": "train", "validation": "val", "testing": "test", "train": "train", "val": "val", "test": "test"}


@dataclass
class Options(CommonOptions):
    audio: str = "fbank"  # fbank: 1,024 x 128 normalised kaldi fbank | stft: 257 x 1,004 log spectrogram
    downmix: str = "pyav"  # stereo to mono: pyav (FFmpeg, 0.707 each) | mean (librosa) | first (channel 0)
    lists: Optional[str] = (
        None  # a folder of train/val/test `<id>,10,<label or class number>` lists, or a JSON database
    )


def normal_label(label: str) -> str:
    """Kinetics names come with spaces ("playing bagpipes") or underscores; the classes use underscores."""
    return "_".join(label.strip().strip('"').lower().split())


def read_annotations(raw: Path) -> list[tuple[str, str, str]]:
    """(clip id, label, split) of the 31 classes from annotations/train.csv (train) and val.csv (test)."""
    entries = []
    for source, split in (("train", "train"), ("val", "test")):
        path = raw / "annotations" / f"{source}.csv"
        if not path.exists():
            raise PrepError(f"{path} not found: give lists=... or the Kinetics-400 annotations folder")
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                label = normal_label(row.get("label", ""))
                if label not in CLASSES:
                    continue
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
                entries.append((f"{row['youtube_id']}_{start:06d}_{end:06d}", label, split))
    return entries


def list_label(field: str) -> str:
    """A list's label field: a class name, or a class NUMBER (the CVPR repository's ``my_train.txt`` /
    ``my_test.txt`` give the index in :data:`CLASSES`' alphabetical order)."""
    text = field.strip().strip('"')
    if text.isdigit():
        index = int(text)
        return CLASSES[index] if index < len(CLASSES) else text
    return normal_label(text)


def split_of(file: Path) -> Optional[str]:
    """The split a list file holds, from its name: ``train.txt``, ``trainlist.csv``, ``my_train.txt``,
    ``ks-test.csv`` ... (a name starting with the split, or with it as a ``_``/``-`` separated word). A name
    that names two splits (``train_val.txt``) is refused."""
    words = set(re.split(r"[_\-.\s]+", file.stem.lower()))
    found = [s for s in ("train", "val", "test") if file.stem.lower().startswith(s) or s in words]
    if len(found) > 1:
        raise PrepError(
            f"lists={file.parent}: {file.name} names several splits ({', '.join(found)}); give each split its own file"
        )
    return found[0] if found else None


def read_lists(path: Path) -> list[tuple[str, str, str]]:
    """(clip id, label, split) from the lab's list files or a JSON database. A clip listed in two splits is a
    :class:`PrepError` naming it."""
    entries = []
    if path.suffix == ".json":
        database = json.loads(path.read_text())
        database = database.get("database", database)
        for clip_id, item in database.items():
            split = SUBSETS.get(str(item.get("subset", "")).lower())
            label = (item.get("annotations") or {}).get("label", item.get("label", ""))
            if split:
                entries.append((clip_id, normal_label(label), split))
        return entries
    files = [p for p in sorted(path.iterdir()) if p.suffix in (".txt", ".csv") and split_of(p)]
    for split in ("train", "test"):
        if not any(split_of(p) == split for p in files):
            raise PrepError(
                f"lists={path}: no {split} list there (a .txt or .csv named like {split}.txt or my_{split}.txt)"
            )
    where: dict[str, str] = {}
    twice: list[str] = []
    for file in files:
        split = split_of(file)
        with open(file, newline="", encoding="utf-8-sig") as f:
            for fields in csv.reader(f):
                if not fields or not fields[0].strip() or fields[0].startswith("#"):
                    continue
                clip_id = Path(fields[0].strip()).stem
                if where.setdefault(clip_id, split) != split:
                    twice.append(f"{clip_id} ({where[clip_id]} and {split})")
                entries.append((clip_id, list_label(fields[-1]), split))
    if twice:
        shown = ", ".join(twice[:5]) + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
        raise PrepError(f"lists={path}: {len(twice)} clip(s) are listed in two splits: {shown}; fix the lists")
    return entries


def list_clips(raw: Path, opts: Options) -> tuple[list[Clip], dict]:
    if opts.lists:
        entries, info = read_lists(Path(opts.lists)), {"mode": "lists", "lists": str(opts.lists)}
    else:
        entries, info = read_annotations(raw), {"mode": "kinetics400", "train": "train", "test": "val"}
    folders = [raw / s for s in ("train", "val", "test") if (raw / s).is_dir()] or [raw]
    files = VideoFiles(folders)
    clips, seen = [], set()
    for clip_id, label, split in entries:
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
        if label not in CLASSES:
            clip.status, clip.reason = "unknown_label", f"{label!r} is not one of the 31 Kinetics-Sounds classes"
        elif path is None:
            clip.status, clip.reason = "missing", f"no video file for {clip_id} (listed in {split}) under {raw}"
        clips.append(clip)
    return clips, info


def run(argv: list[str]) -> dict:
    """The prep of ``argv`` (key=value options): its summary, or a PrepError."""
    usage = "python -m data_prep.kinetics_sounds raw_root=/path/to/kinetics400 [lists=...] [audio=fbank|stft]"
    expected = (
        "clips of the 31 Kinetics-Sounds classes listed in annotations/{{train,val}}.csv (or lists=), as "
        "<ytid>_<start:06d>_<end:06d>.mp4 files under raw_root={raw}"
    )
    return prep_audio_visual(DATASET, CLASSES, Options, list_clips, usage, argv, expected)


def main(argv=None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
