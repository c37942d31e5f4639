"""UCF-101 (RGB + optical flow, 101 classes) from its prepared cache (`make prep-ucf101`)."""

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, List

from onthefly.config import Range, configurable
from onthefly.data.clips import ClipCache


@configurable("dataset")
@dataclass(eq=False)
class UCF101(ClipCache):
    """UCF-101: modalities ``visual`` (RGB frames, 3 channels) and ``flow`` (TV-L1 u, v: 2 channels), sampled at
    the same times from 3 segments, with one shared crop and flip (u negated on a flip).

    The journal leaves its three-modality variant open; the likely third modality, the TSN-style RGB
    difference (the next video frame minus this one), is offered as modality ``rgb_diff``: add it to
    ``modalities`` after a prep with ``rgb_diff=true`` (which also caches each frame's successor).

    ``fold`` is the official split (1-3) the cache was indexed with; another fold is a quick re-run of the prep
    (no clip is decoded again). UCF-101 has no val split: ``val_fraction`` of train is held out.
    """

    name: ClassVar[str] = "ucf101"
    all_modalities: ClassVar[tuple[str, ...]] = ("visual", "flow", "rgb_diff")

    root: str = "data/ucf101"
    modalities: List[str] = ("visual", "flow")
    fold: Annotated[int, Range(ge=1, le=3)] = 1

    def recipe_checks(self) -> dict[str, tuple[Any, str]]:
        checks = {**super().recipe_checks(), "splits.fold": (self.fold, f"FOLD={self.fold}")}
        if "rgb_diff" in self.modalities:  # the cache must hold each frame's successor
            checks["rgb_diff"] = (True, "ARGS=rgb_diff=true")
        return checks
