"""CREMA-D (audio + visual, 6 emotions) from its prepared cache (`make prep-cremad`; DATA.md)."""
from __future__ import annotations

from typing import List, Optional

from onthefly.config import configurable
from onthefly.data.clips import CachedDataset
from onthefly.data.sampling import Sampling


@configurable("dataset")
class CremaD(CachedDataset):
    """CREMA-D: log-STFT (`ogm_ge`, 257 x 188) or kaldi fbank audio, and 1-fps face frames.

    ``split`` (None: whatever the cache holds) must match the cache's split mode: ``random`` (the OGM-GE papers'
    seeded 6,698 / 744), ``speaker`` (actors held out) or ``lists`` (the user's ``<clip>,<EMO>`` files).
    The papers have no val split: ``val_fraction`` of train is held out (stratified, ``val_seed``); 0 makes val
    the test split (the official code's choice, flagged in the log).
    """

    name = "cremad"
    all_modalities = ("audio", "visual")

    def __init__(
        self,
        root: str = "data/cremad",
        modalities: List[str] = ["audio", "visual"],  # noqa: B006 (copied by the schema)
        audio_recipe: str = "ogm_ge",
        num_frames: int = 1,
        image_size: int = 224,
        crop_scale: List[float] = [0.08, 1.0],  # noqa: B006
        sampling: Sampling = Sampling.segments,
        frame_short_side: int = 256,
        split: Optional[str] = None,
        val_fraction: float = 0.1,
        val_seed: int = 0,
    ):
        self._setup(root, modalities, audio_recipe, num_frames, image_size, crop_scale, sampling, frame_short_side,
                    val_fraction, val_seed, split_checks={"splits.mode": (split, f"SPLIT={split}")})
