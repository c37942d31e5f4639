"""CREMA-D: ``VideoFlash/<clip>.flv`` + ``AudioWAV/<clip>.wav`` -> a cache of audio spectrograms and 1-fps frames.

    python -m data_prep.cremad raw_root=/path/to/CREMA-D [out_root=...] [audio=ogm_ge|fbank] [workers=N]
        [splits=/folder/with/train.csv,test.csv] [split=random|speaker] [seed=0]

Splits: given list files (``<clip>,<EMO>`` lines, or bare clip names; ``val.csv`` optional) define the clips and
their splits: the CVPR 2022 repository's ``data/CREMAD/train.csv`` (6,698 clips) and ``test.csv`` (744), at its
commit 343dc1d, are such lists (docs/data.md). A clip listed in two splits is refused. Otherwise every clip found
is split with ``seed``: ``random`` (default) is a stratified split of the OGM-GE papers' sizes (test = 744/7,442
of the clips, the same share of each emotion; not the papers' own clips); ``speaker`` holds out the same share of
actors (speaker-independent).
"""

from __future__ import annotations

import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data_prep.cache import Clip
from data_prep.errors import PrepError
from data_prep.pipeline import CommonOptions, cli, prep_audio_visual, stratified_test

DATASET = "cremad"
EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]  # label index = this order
NAME = re.compile(r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{1,2})$")
PUBLISHED_TEST_SHARE = 744 / 7442
EXPECTED = (
    "VideoFlash/<clip>.flv and AudioWAV/<clip>.wav files under raw_root={raw}, named "
    "ACTOR_SENTENCE_EMOTION_LEVEL (e.g. 1001_DFA_ANG_XX)"
)


@dataclass
class Options(CommonOptions):
    audio: str = "ogm_ge"  # ogm_ge: 257 x 188 log-STFT at 22,050 Hz | fbank: kaldi fbank, 128 mel bins
    downmix: str = "pyav"  # stereo to mono: pyav (FFmpeg, 0.707 each) | mean (librosa) | first (channel 0)
    resample: str = "sinc"  # WAV 16 kHz -> 22,050 Hz: sinc (torchaudio) | kaiser_best (librosa < 0.10, the CVPR loader)
    splits: Optional[str] = None  # a folder holding train.csv and test.csv (and val.csv) of `<clip>,<EMO>` lines
    split: str = "random"  # without lists: random (stratified) | speaker (actors held out)
    seed: int = 0
    test_share: float = PUBLISHED_TEST_SHARE


def _list_file(folder: Path, split: str) -> Optional[Path]:
    for ext in (".csv", ".txt"):
        if (folder / f"{split}{ext}").exists():
            return folder / f"{split}{ext}"
    return None


def read_lists(folder: Path) -> tuple[list[tuple[str, Optional[str], str]], list[str]]:
    """(clip, emotion or None, split) from ``<clip>,<EMO>`` list files (or bare clip names: the emotion then
    comes from the name), and the files read. A clip listed in two splits is a :class:`PrepError` naming it."""
    entries, files = [], []
    where: dict[str, str] = {}
    twice: list[str] = []
    for split in ("train", "val", "test"):
        path = _list_file(folder, split)
        if path is None:
            if split != "val":
                raise PrepError(f"splits={folder}: no {split}.csv (or {split}.txt) of `<clip>,<EMO>` lines there")
            continue
        files.append(str(path))
        with open(path, newline="", encoding="utf-8-sig") as f:  # the CVPR lists have CRLF line ends
            for fields in csv.reader(f):
                fields = [x.strip() for x in fields]
                if not fields or not fields[0] or fields[0].startswith("#"):
                    continue
                name = Path(fields[0]).stem
                if name in where and where[name] != split:
                    twice.append(f"{name} ({where[name]} and {split})")
                where.setdefault(name, split)
                entries.append((name, fields[1] if len(fields) > 1 and fields[1] else None, split))
    if twice:
        shown = ", ".join(twice[:5]) + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
        raise PrepError(
            f"splits={folder}: {len(twice)} clip(s) are listed in two splits: {shown}. A clip in train "
            "and test would leak into the evaluation; fix the lists so each clip is in one of them."
        )
    return entries, files


def make_clip(raw: Path, name: str, split: Optional[str], listed_label: Optional[str] = None, where: str = "") -> Clip:
    video, wav = raw / "VideoFlash" / f"{name}.flv", raw / "AudioWAV" / f"{name}.wav"
    clip = Clip(name, None, split, {"video": str(video), "audio": str(wav)}, source=f"VideoFlash/{name}.flv")
    m = NAME.match(name)
    if not m or m["emotion"] not in EMOTIONS:
        clip.status = "bad_name"
        clip.reason = f"{name} is not ACTOR_SENTENCE_EMOTION_LEVEL with an emotion in {EMOTIONS}"
        return clip
    clip.label = m["emotion"]
    if listed_label is not None and listed_label.upper() != clip.label:
        clip.status, clip.reason = "bad_label", f"{where} labels {name} {listed_label!r}, its name says {clip.label}"
        return clip
    absent = [p.relative_to(raw).as_posix() for p in (video, wav) if not p.exists()]
    if absent:
        clip.status = "missing"
        clip.reason = f"{' and '.join(absent)} not found" + (f" (listed in {where})" if where else "")
    return clip


def list_clips(raw: Path, opts: Options) -> tuple[list[Clip], dict]:
    if opts.splits:
        entries, files = read_lists(Path(opts.splits))
        seen, clips = set(), []
        for name, emotion, split in entries:
            if name in seen:
                continue
            seen.add(name)
            clips.append(make_clip(raw, name, split, emotion, where=f"{split} list"))
        return clips, {"mode": "lists", "files": files}
    names = sorted(
        {p.stem for p in (raw / "VideoFlash").glob("*.flv")} | {p.stem for p in (raw / "AudioWAV").glob("*.wav")}
    )
    if not names:
        raise PrepError(f"cremad: no clip found. Expected {EXPECTED.format(raw=raw)}; is it the CREMA-D folder?")
    clips = [make_clip(raw, n, None) for n in names]
    valid = [c for c in clips if c.label is not None]
    test_size = int(round(len(valid) * opts.test_share))
    if opts.split == "random":
        mask = stratified_test([c.label for c in valid], test_size, opts.seed)
        info = {"mode": "random", "seed": opts.seed, "test_share": opts.test_share}
    elif opts.split == "speaker":
        actors = sorted({c.id[:4] for c in valid})
        rng = np.random.default_rng(opts.seed)
        held = set(rng.permutation(actors)[: max(1, int(round(len(actors) * opts.test_share)))].tolist())
        mask = np.array([c.id[:4] in held for c in valid])
        info = {"mode": "speaker", "seed": opts.seed, "test_actors": sorted(held)}
    else:
        raise PrepError(f"split={opts.split!r}: use random or speaker (or give splits=<folder of lists>)")
    for clip, test in zip(valid, mask):
        clip.split = "test" if test else "train"
    return clips, info


def run(argv: list[str]) -> dict:
    """The prep of ``argv`` (key=value options): its summary, or a PrepError."""
    usage = "python -m data_prep.cremad raw_root=/path/to/CREMA-D [out_root=...] [audio=ogm_ge|fbank] [splits=DIR]"
    return prep_audio_visual(DATASET, EMOTIONS, Options, list_clips, usage, argv, EXPECTED)


def main(argv=None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
