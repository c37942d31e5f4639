"""UCF-101 -> a cache of 1-fps RGB frames and the TV-L1 optical flow (u, v) at the same times.

    python -m data_prep.ucf101 raw_root=/path/to/UCF-101 splits=/path/to/ucfTrainTestlist flow=/path/to/tvl1_flow
        [fold=1]

Raw: ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi``; ``ucfTrainTestlist/`` with ``classInd.txt`` (``1 ApplyEyeMakeup``,
1-based), ``trainlistNN.txt`` (``Class/v_....avi label``) and ``testlistNN.txt`` (``Class/v_....avi``); flow:
the precomputed TV-L1 release ``{u,v}/v_<video>/frame%06d.jpg`` (grayscale, 128 = still). Names are matched
case-insensitively (folder HandstandPushups holds files spelled HandStandPushups). For each RGB frame time t
the flow frame between video frames floor(t * fps) and the next one is stored. Another fold re-indexes the same
clips: re-running with ``fold=2`` decodes nothing again. ``rgb_diff=true`` also stores the video frame after
each RGB frame, for the RGB-difference modality (the journal's open three-modality variant).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from data_prep.cache import Clip, Result
from data_prep.errors import PrepError, UsageError
from data_prep.media import MissingFile, decode_container, encode_frame, read_jpeg_file
from data_prep.pipeline import CommonOptions, cli, default_out, existing_folder, frame_recipe, parse_args, run_prep

DATASET = "ucf101"
EXPECTED = "<Class>/v_<Class>_gXX_cYY.avi files under raw_root={raw}"
FLOW_RECIPE = {
    "source": "precomputed TV-L1 JPEGs ({u,v}/v_<video>/frame%06d.jpg)",
    "time": "flow frame floor(t * fps) + 1 (1-based) at each RGB frame time t",
}


@dataclass
class Options(CommonOptions):
    splits: str = ""  # the ucfTrainTestlist folder (required)
    flow: str = ""  # the TV-L1 flow folder holding u/ and v/ (required)
    fold: int = 1  # official split 1, 2 or 3
    rgb_diff: bool = False  # also cache the frame after each one (the RGB-difference modality, TSN style)


def read_classes(folder: Path) -> list[str]:
    path = folder / "classInd.txt"
    if not path.is_file():
        raise PrepError(
            f"splits={folder}: no classInd.txt there. Expected the ucfTrainTestlist folder of the "
            "release: classInd.txt (`1 ApplyEyeMakeup` lines), trainlist01-03.txt and testlist01-03.txt"
        )
    classes = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                fields = line.split()
                if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) != len(classes) + 1:
                    raise PrepError(
                        f"{path} line {number}: expected `{len(classes) + 1} <ClassName>`, found {line.strip()[:60]!r}"
                    )
                classes.append(fields[1])
    if not classes:
        raise PrepError(f"{path} names no class (expected `1 ApplyEyeMakeup`, `2 ApplyLipstick`, ... lines)")
    return classes


def _walk(root: Path, suffix: str) -> dict[str, Path]:
    """lower-case file stem -> path, for every file ending in ``suffix`` under ``root``."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(suffix):
                found.setdefault(f[: -len(suffix)].lower(), Path(dirpath) / f)
    return found


def _subdirs(root: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}


def list_clips(raw: Path, split_dir: Path, flow_root: Path, fold: int) -> tuple[list[Clip], list[str]]:
    classes = read_classes(split_dir)
    by_lower = {c.lower(): c for c in classes}
    videos = _walk(raw, ".avi")
    if not videos:
        raise PrepError(f"ucf101: no clip found. Expected {EXPECTED.format(raw=raw)}")
    flow_u, flow_v = _subdirs(flow_root / "u"), _subdirs(flow_root / "v")
    if not flow_u or not flow_v:
        raise PrepError(f"flow={flow_root}: expected u/v_<video>/ and v/v_<video>/ folders of frame%06d.jpg")
    clips, seen = [], set()
    for split, name in (("train", f"trainlist{fold:02d}.txt"), ("test", f"testlist{fold:02d}.txt")):
        path = split_dir / name
        if not path.exists():
            raise PrepError(f"{path} not found: fold={fold} needs trainlist{fold:02d}.txt and testlist{fold:02d}.txt")
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rel = line.split()[0].replace("\\", "/")
            folder, file = rel.split("/")[-2:] if "/" in rel else ("", rel)
            video_id = Path(file).stem
            if video_id.lower() in seen:
                continue
            seen.add(video_id.lower())
            named = video_id.split("_")[1].lower() if video_id.count("_") >= 1 else ""  # v_<Class>_gXX_cYY
            label = by_lower.get(folder.lower()) or by_lower.get(named)
            avi = videos.get(video_id.lower())
            u, v = flow_u.get(video_id.lower()), flow_v.get(video_id.lower())
            clip = Clip(video_id, label, split, source=avi.relative_to(raw).as_posix() if avi else rel)
            if avi:
                clip.sources = {"video": str(avi)}
                if u and v:
                    clip.sources.update(flow_u=str(u), flow_v=str(v))
            if label is None:
                clip.status, clip.reason = "unknown_label", f"{rel}: its class is not in classInd.txt"
            elif avi is None:
                clip.status, clip.reason = "missing", f"{rel} (listed in {name}) not found under {raw}"
            elif not (u and v):
                clip.status = "missing"
                clip.reason = f"no flow folder {'u' if not u else 'v'}/{video_id} under {flow_root} (listed in {name})"
            clips.append(clip)
    return clips, classes


def _flow_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise MissingFile(f"{folder} holds no flow JPEG")
    return files


def process(clip: Clip, config: dict) -> Result:
    decoded = decode_container(
        Path(clip.sources["video"]),
        short_side=config["short_side"],
        with_next=bool(config.get("rgb_diff")),
        frame_times=config.get("frame_times", "centre"),
    )
    u_files, v_files = _flow_files(Path(clip.sources["flow_u"])), _flow_files(Path(clip.sources["flow_v"]))
    n_flow = min(len(u_files), len(v_files))
    fps = decoded.fps or 25.0
    jpegs = []
    for frame, t in zip(decoded.frames, decoded.times):
        k = min(n_flow, max(1, int(math.floor(t * fps)) + 1)) - 1
        jpegs.append(encode_frame(frame, config["jpeg_quality"]))
        for files in (u_files, v_files):
            jpegs.append(read_jpeg_file(files[k], config["short_side"], config["jpeg_quality"], gray=True))
    if config.get("rgb_diff"):  # the successor of every frame: a 4th stream, interleaved like the others
        jpegs = [
            j
            for t in range(len(decoded.frames))
            for j in (*jpegs[3 * t : 3 * t + 3], encode_frame(decoded.next_frames[t], config["jpeg_quality"]))
        ]
    return Result(clip.id, duration=decoded.duration, n_frames=len(decoded.frames), jpegs=jpegs)


def run(argv: list[str]) -> dict:
    """The prep of ``argv`` (key=value options): its summary, or a PrepError."""
    usage = "python -m data_prep.ucf101 raw_root=/path/to/UCF-101 splits=/path/to/ucfTrainTestlist flow=/path/to/flow"
    opts = parse_args(argv, Options, usage)
    if not opts.splits or not opts.flow:
        raise UsageError(f"splits= and flow= are required\nusage: {usage}")
    raw, split_dir, flow_root = (existing_folder(getattr(opts, k), k) for k in ("raw_root", "splits", "flow"))
    clips, classes = list_clips(raw, split_dir, flow_root, opts.fold)
    recipe = {"frames": frame_recipe(opts), "flow": FLOW_RECIPE, **({"rgb_diff": True} if opts.rgb_diff else {})}
    streams = ["visual", "flow_u", "flow_v"] + (["visual_next"] if opts.rgb_diff else [])
    out = Path(opts.out_root).expanduser() if opts.out_root else default_out(DATASET)
    return run_prep(
        dataset=DATASET,
        clips=clips,
        out_root=out,
        recipe=recipe,
        streams=streams,
        array=None,
        classes=classes,
        splits={"mode": "official", "fold": opts.fold},
        work=process,
        opts=opts,
        raw_root=raw,
        expected=f"the videos of trainlist{opts.fold:02d}.txt and testlist{opts.fold:02d}.txt in "
        f"splits={split_dir} as {EXPECTED.format(raw=raw)}, with flow folders "
        f"u/v_<video>/ and v/v_<video>/ under flow={flow_root}",
    )


def main(argv=None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
