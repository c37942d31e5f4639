"""Kinetics-Sounds (audio + visual, 31 Kinetics-400 classes) from its prepared cache (`make prep-kinetics-sounds`)."""

from dataclasses import dataclass
from typing import ClassVar

from onthefly.config import configurable
from onthefly.data.clips import AudioClipCache


@configurable("dataset")
@dataclass(eq=False)
class KineticsSounds(AudioClipCache):
    """Kinetics-Sounds: kaldi fbank audio (1,024 x 128, normalised; or `stft`, 257 x 1,004) and ten 1-fps frames.

    CVPR 2022: 3 frames at 224 px; the journal code: 112 px, first / middle / last (``sampling: spread``).
    The val split is the one in the cache when the prep had one (the lab's lists); otherwise ``val_fraction`` of
    train is held out.
    """

    name: ClassVar[str] = "kinetics_sounds"
    all_modalities: ClassVar[tuple[str, ...]] = ("audio", "visual")

    root: str = "data/kinetics_sounds"
    audio_recipe: str = "fbank"
