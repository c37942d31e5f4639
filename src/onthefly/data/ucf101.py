"""UCF-101 (RGB + optical flow, 101 classes) from its prepared cache (`make prep-ucf101`)."""
from __future__ import annotations

from typing import List

from onthefly.config import configurable
from onthefly.data.clips import CachedDataset
from onthefly.data.sampling import Sampling


@configurable("dataset")
class UCF101(CachedDataset):
    """UCF-101: modalities ``visual`` (RGB frames, 3 channels) and ``flow`` (TV-L1 u, v: 2 channels), sampled at
    the same times from 3 segments, with one shared crop and flip (u negated on a flip).

    DATA.md leaves the journal's three-modality variant open; the likely third modality, the TSN-style RGB
    difference (the next video frame minus this one), is offered as modality ``rgb_diff``: add it to
    ``modalities`` after a prep with ``rgb_diff=true`` (which also caches each frame's successor).

    ``fold`` is the official split (1-3) the cache was indexed with; another fold is a quick re-run of the prep
    (no clip is decoded again). UCF-101 has no val split: ``val_fraction`` of train is held out.
    """

    name = "ucf101"
    all_modalities = ("visual", "flow", "rgb_diff")

    def __init__(
        self,
        root: str = "data/ucf101",
        modalities: List[str] = ["visual", "flow"],  # noqa: B006
        fold: int = 1,
        num_frames: int = 3,
        image_size: int = 224,
        crop_scale: List[float] = [0.08, 1.0],  # noqa: B006
        sampling: Sampling = Sampling.segments,
        frame_short_side: int = 256,
        val_fraction: float = 0.1,
        val_seed: int = 0,
    ):
        checks = {"splits.fold": (fold, f"FOLD={fold}")}
        if "rgb_diff" in modalities:  # the cache must hold each frame's successor
            checks["rgb_diff"] = (True, "ARGS=rgb_diff=true")
        self._setup(root, modalities, None, num_frames, image_size, crop_scale, sampling, frame_short_side,
                    val_fraction, val_seed, split_checks=checks)
