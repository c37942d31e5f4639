"""CREMA-D (audio + visual, 6 emotions) from its prepared cache (`make prep-cremad`; DATA.md)."""
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from onthefly.config import PositiveInt, configurable
from onthefly.data.clips import AudioClipCache


@configurable("dataset")
@dataclass(eq=False)
class CremaD(AudioClipCache):
    """CREMA-D: log-STFT (`ogm_ge`, 257 x 188) or kaldi fbank audio, and 1-fps face frames.

    ``split`` (None: whatever the cache holds) must match the cache's split mode: ``random`` (the OGM-GE papers'
    seeded 6,698 / 744), ``speaker`` (actors held out) or ``lists`` (the user's ``<clip>,<EMO>`` files).
    The papers have no val split: ``val_fraction`` of train is held out (stratified, ``val_seed``); 0 makes val
    the test split (the official code's choice, flagged in the log).
    """

    name: ClassVar[str] = "cremad"
    all_modalities: ClassVar[tuple[str, ...]] = ("audio", "visual")

    root: str = "data/cremad"
    num_frames: PositiveInt = 1
    audio_recipe: str = "ogm_ge"
    split: Optional[str] = None

    def recipe_checks(self) -> dict[str, tuple[Any, str]]:
        checks = super().recipe_checks()
        if self.split is not None:
            checks["splits.mode"] = (self.split, f"SPLIT={self.split}")
        return checks
