"""Kinetics-Sounds (audio + visual, 31 Kinetics-400 classes) from its prepared cache (`make prep-kinetics-sounds`)."""
from __future__ import annotations

from typing import List

from onthefly.config import configurable
from onthefly.data.clips import CachedDataset
from onthefly.data.sampling import Sampling


@configurable("dataset")
class KineticsSounds(CachedDataset):
    """Kinetics-Sounds: kaldi fbank audio (1,024 x 128, normalised; or `stft`, 257 x 1,004) and ten 1-fps frames.

    CVPR 2022: 3 frames at 224 px; the journal code: 112 px, first / middle / last (``sampling: spread``).
    The val split is the one in the cache when the prep had one (the lab's lists); otherwise ``val_fraction`` of
    train is held out.
    """

    name = "kinetics_sounds"
    all_modalities = ("audio", "visual")

    def __init__(
        self,
        root: str = "data/kinetics_sounds",
        modalities: List[str] = ["audio", "visual"],  # noqa: B006
        audio_recipe: str = "fbank",
        num_frames: int = 3,
        image_size: int = 224,
        crop_scale: List[float] = [0.08, 1.0],  # noqa: B006
        sampling: Sampling = Sampling.segments,
        frame_short_side: int = 256,
        val_fraction: float = 0.1,
        val_seed: int = 0,
    ):
        self._setup(root, modalities, audio_recipe, num_frames, image_size, crop_scale, sampling, frame_short_side,
                    val_fraction, val_seed)
