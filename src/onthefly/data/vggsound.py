"""VGGSound (audio + visual, 309 classes) from its prepared cache (`make prep-vggsound`, shardable)."""
from __future__ import annotations

from typing import List

from onthefly.config import configurable
from onthefly.data.clips import CachedDataset
from onthefly.data.sampling import Sampling


@configurable("dataset")
class VGGSound(CachedDataset):
    """VGGSound: the whole-clip 129 x 1,251 log spectrogram is cached; each sample takes ``audio_crop`` frames
    (626 = 5 s): a random window in training, the centre in evaluation. Ten 1-fps frames cached, 3 used.
    """

    name = "vggsound"
    all_modalities = ("audio", "visual")

    def __init__(
        self,
        root: str = "data/vggsound",
        modalities: List[str] = ["audio", "visual"],  # noqa: B006
        audio_recipe: str = "ogm_ge",
        audio_crop: int = 626,
        num_frames: int = 3,
        image_size: int = 224,
        crop_scale: List[float] = [0.08, 1.0],  # noqa: B006
        sampling: Sampling = Sampling.segments,
        frame_short_side: int = 256,
        val_fraction: float = 0.1,
        val_seed: int = 0,
    ):
        self._setup(root, modalities, audio_recipe, num_frames, image_size, crop_scale, sampling, frame_short_side,
                    val_fraction, val_seed, audio_crop=audio_crop)
