"""Tiny media in the datasets' real raw layouts, generated for the prep and reader tests (nothing is committed).

Every video shows a flat colour that changes each second (``colour_at(second)``), so a test can tell which
second a cached frame came from; every audio track is a sine at a chosen frequency, so a test can find its
peak in the spectrogram. Containers and codecs are the real ones: FLV (Sorenson flv1 + MP3) and 16-kHz WAV for
CREMA-D, MP4 (H.264 + AAC) for Kinetics and VGGSound, AVI (MPEG-4 part 2, no audio) for UCF-101.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import soundfile as sf
from PIL import Image

from data_prep.synthetic import colour_at, sine, write_video, write_wav  # noqa: F401  (the tests use them from here)

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 212992\n"
)


def write_lfs_pointer(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LFS_POINTER)
    return path


def truncate(path: Path, keep: float = 0.4) -> Path:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def write_flow_jpegs(folder: Path, n: int, size=(64, 48), value: int = 128, gradient: bool = False) -> None:
    """``frame000001.jpg`` ... grayscale JPEGs (a TV-L1 release's layout); ``gradient``: brightness rising to the
    right."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(1, n + 1):
        img = np.full((h, w), value, dtype=np.uint8)
        if gradient:
            img[:] = np.linspace(30, 225, w).round().astype(np.uint8)
        Image.fromarray(img).save(folder / f"frame{i:06d}.jpg", quality=95)


def write_csv(path: Path, rows: Iterable[Iterable], header: Optional[list[str]] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


# --- raw trees in each dataset's layout, with the bad inputs of docs/data.md ---------------------------------------
EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
SINE_HZ = 1000.0  # every good clip's audio


def make_cremad(root: Path, per_emotion: int = 2) -> dict:
    """``VideoFlash/*.flv`` (flv1 + MP3 at 22,050 Hz) + ``AudioWAV/*.wav`` (16 kHz) and train/test lists.

    Bad inputs: a git-LFS pointer instead of an FLV, a zero-length WAV, a WAV with a header and no samples, a
    truncated FLV, and a list entry whose files do not exist.
    """
    root = Path(root)
    good = []
    for i in range(per_emotion * len(EMOTIONS)):
        name = f"{1001 + i}_IEO_{EMOTIONS[i % len(EMOTIONS)]}_MD"
        write_video(root / "VideoFlash" / f"{name}.flv", 2.5, shift=i, audio_rate=22050)
        write_wav(root / "AudioWAV" / f"{name}.wav", 1.5 + 0.25 * (i % 3), freq=SINE_HZ)
        good.append(name)
    bad = {
        "1076_MTI_SAD_XX": "empty_file",  # 0-byte WAV
        "1076_MTI_NEU_XX": "empty_audio",  # a WAV header and no samples
        "1020_IEO_ANG_HI": "lfs_pointer",
        "1064_IEO_DIS_MD": "truncated",
        "1090_DFA_HAP_LO": "missing",  # listed, no files
    }
    for name in ("1076_MTI_SAD_XX", "1076_MTI_NEU_XX", "1020_IEO_ANG_HI", "1064_IEO_DIS_MD"):
        write_video(root / "VideoFlash" / f"{name}.flv", 2.0)
        write_wav(root / "AudioWAV" / f"{name}.wav", 1.0, freq=SINE_HZ)
    (root / "AudioWAV" / "1076_MTI_SAD_XX.wav").write_bytes(b"")
    sf.write(str(root / "AudioWAV" / "1076_MTI_NEU_XX.wav"), np.zeros(0, np.float32), 16000)
    write_lfs_pointer(root / "VideoFlash" / "1020_IEO_ANG_HI.flv")
    write_video(root / "VideoFlash" / "1064_IEO_DIS_MD.flv", 3.0, audio_freq=None)
    truncate(root / "VideoFlash" / "1064_IEO_DIS_MD.flv", 0.35)
    names = good + list(bad)
    test = set(good[: len(EMOTIONS)])  # one clip of each emotion
    lists = root / "lists"
    write_csv(lists / "train.csv", [(n, n.split("_")[2]) for n in names if n not in test])
    write_csv(lists / "test.csv", [(n, n.split("_")[2]) for n in names if n in test])
    return {"raw": root, "lists": lists, "good": good, "bad": bad, "test": sorted(test)}


def write_cvpr_cremad_lists(folder: Path, train: Iterable[str], test: Iterable[str]) -> Path:
    """``train.csv`` and ``test.csv`` as the CVPR 2022 repository ships them (data/CREMAD/): ``<clip>,<EMO>``
    lines with CRLF line ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", train), ("test", test)):
        (folder / f"{split}.csv").write_bytes("".join(f"{n},{n.split('_')[2]}\r\n" for n in names).encode())
    return folder


def ytid(i: int) -> str:
    """An 11-character YouTube-like id, some with '-' and '_' inside."""
    return f"{'-_'[i % 2]}v{i:03d}_ab-cd"[:11]


KS_CLASSES = ["blowing_nose", "playing_bagpipes", "tap_dancing"]


def make_kinetics(root: Path, seconds: float = 2.0) -> dict:
    """Kinetics-400 layout: ``{train,val}/<ytid>_<start:06d>_<end:06d>.mp4`` (H.264 + AAC 16 kHz) and
    ``annotations/{train,val}.csv`` with spaces in labels; a non-Kinetics-Sounds class that must be left out.

    Bad inputs: an mp4 without an audio track, a truncated mp4, a row whose file is absent.
    """
    root = Path(root)
    header = ["label", "youtube_id", "time_start", "time_end", "split"]
    rows = {"train": [], "val": []}
    clips = {}
    i = 0
    for split, per_class in (("train", 3), ("val", 1)):
        for label in KS_CLASSES + ["abseiling"]:
            for _ in range(per_class):
                yt, start = ytid(i), 10 * i
                clip_id = f"{yt}_{start:06d}_{start + 10:06d}"
                rows[split].append((label.replace("_", " "), yt, start, start + 10, split))
                if label != "abseiling":
                    write_video(
                        root / split / f"{clip_id}.mp4",
                        seconds,
                        size=(64, 48),
                        shift=i,
                        audio_rate=16000,
                        audio_freq=SINE_HZ,
                    )
                    clips[clip_id] = (label, "train" if split == "train" else "test")
                i += 1
    bad = {}
    for split, status in (("train", "no_audio"), ("train", "unreadable"), ("val", "missing")):
        yt, start = ytid(i), 10 * i
        clip_id = f"{yt}_{start:06d}_{start + 10:06d}"
        rows[split].append(("playing bagpipes", yt, start, start + 10, split))
        if status == "no_audio":
            write_video(root / split / f"{clip_id}.mp4", seconds, audio_freq=None)
        elif status == "unreadable":
            write_video(root / split / f"{clip_id}.mp4", seconds, audio_rate=16000)
            truncate(root / split / f"{clip_id}.mp4", 0.5)
        bad[clip_id] = status
        i += 1
    for split in rows:
        write_csv(root / "annotations" / f"{split}.csv", rows[split], header)
    return {"raw": root, "clips": clips, "bad": bad}


VGG_LABELS = ["dog barking", "people marching, chanting", "playing piano"]


def make_vggsound(root: Path, seconds: float = 2.0) -> dict:
    """``vggsound.csv`` (no header; unpadded start; a label with a quoted comma) and clips named
    ``<ytid>_<start:06d>.mp4`` or, for some, ``<ytid>_<start>.mp4`` (unpadded), in a sub-folder.

    Bad inputs: a listed clip with no file, an mp4 without audio, a malformed csv row.
    """
    root = Path(root)
    rows, clips = [], {}
    i = 0
    for split, per_class in (("train", 3), ("test", 1)):
        for label in VGG_LABELS:
            for _ in range(per_class):
                yt, start = ytid(i), 7 * i + 1
                name = f"{yt}_{start}" if i % 3 == 0 else f"{yt}_{start:06d}"
                write_video(root / "video" / f"{name}.mp4", seconds, shift=i, audio_rate=16000, audio_freq=SINE_HZ)
                rows.append((yt, start, label, split))
                clips[f"{yt}_{start:06d}"] = (label, split)
                i += 1
    bad = {}
    yt = ytid(i)
    rows.append((yt, 5, "dog barking", "test"))
    bad[f"{yt}_{5:06d}"] = "missing"
    yt = ytid(i + 1)
    write_video(root / "video" / f"{yt}_{9:06d}.mp4", seconds, audio_freq=None)
    rows.append((yt, 9, "playing piano", "train"))
    bad[f"{yt}_{9:06d}"] = "no_audio"
    csv_path = write_csv(root / "vggsound.csv", rows)
    with open(csv_path, "a") as f:
        f.write("not-a-row,with,too,many,fields\n")
    return {"raw": root, "csv": csv_path, "clips": clips, "bad": bad, "labels": sorted(set(VGG_LABELS))}


UCF_CLASSES = ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]


def make_ucf101(root: Path, seconds: float = 2.0, fps: int = 10) -> dict:
    """``UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` (MPEG-4 in AVI, no audio), ``ucfTrainTestlist/`` (classInd,
    trainlist01, testlist01) and TV-L1 flow JPEG folders ``{u,v}/v_<video>/frame%06d.jpg``. Folder
    HandstandPushups holds files spelled HandStandPushups, as in the release. Flow frame k (1-based) has
    value 10 k in u and 250 - 10 k in v, so a test can tell which flow frame was stored.

    Bad inputs: a listed video that is absent, a video without flow folders.
    """
    root = Path(root)
    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    flow = root / "tvl1_flow"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    train, test, clips = [], [], {}
    for ci, cls in enumerate(UCF_CLASSES):
        spelled = "HandStandPushups" if cls == "HandstandPushups" else cls
        for g in (1, 2, 8, 9):
            vid = f"v_{spelled}_g{g:02d}_c01"
            write_video(videos / cls / f"{vid}.avi", seconds, fps=fps, shift=ci + g, audio_freq=None)
            n_flow = int(seconds * fps) - 1
            for comp, value in (("u", lambda k: 10 * k), ("v", lambda k: 250 - 10 * k)):
                folder = flow / comp / vid
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(1, n_flow + 1):
                    img = Image.fromarray(np.full((48, 64), value(k), np.uint8))
                    img.save(folder / f"frame{k:06d}.jpg", quality=95)
            if g < 8:
                train.append(f"{cls}/{vid}.avi {ci + 1}")
                clips[vid] = (cls, "train")
            else:
                test.append(f"{cls}/{vid}.avi")
                clips[vid] = (cls, "test")
    bad = {"v_YoYo_g03_c01": "missing", "v_YoYo_g04_c01": "missing"}
    train.append("YoYo/v_YoYo_g03_c01.avi 3")  # listed, no file
    write_video(videos / "YoYo" / "v_YoYo_g04_c01.avi", seconds, fps=fps, audio_freq=None)  # no flow folders
    test.append("YoYo/v_YoYo_g04_c01.avi")
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    # fold 2: the same videos, train and test swapped
    (lists / "trainlist02.txt").write_text("".join(f"{t} {UCF_CLASSES.index(t.split('/')[0]) + 1}\n" for t in test))
    (lists / "testlist02.txt").write_text("".join(t.split()[0] + "\n" for t in train))
    return {"raw": videos, "lists": lists, "flow": flow, "clips": clips, "bad": bad, "fps": fps}


# --- running a prep and a training run in-process ---------------------------------------------------------------
def prep(module, **options) -> dict:
    """``python -m data_prep.<module> key=value ...`` in this process (one worker, no progress bar) -> its summary
    (or the PrepError it raises)."""
    args = {"workers": 1, "progress": "false", **options}
    return module.run([f"{k}={v}" for k, v in args.items()])


def train_once(dataset: str, root: Path, out_dir: Path, *overrides: str) -> dict:
    """One tiny epoch on a prepared cache: small ResNets, 32-px frames, two batches of 3 (never a batch of one,
    which BatchNorm refuses), no W&B."""
    from onthefly.config import compose
    from onthefly.engine.run import run

    cfg = compose(
        [
            "debug=fast",
            f"dataset={dataset}",
            f"dataset.root={root}",
            "dataset.image_size=32",
            "backbone=resnet18_small",
            "trainer.epochs=1",
            "trainer.batch_size=3",
            "trainer.eval_batch_size=8",
            "trainer.limit_train_batches=2",
            "trainer.limit_eval_batches=2",
            "trainer.threads=1",
            "trainer.plots=false",
            "trainer.save_checkpoint=false",
            *overrides,
        ]
    )
    return run(cfg, out_dir)
