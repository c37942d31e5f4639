"""CREMA-D (audio + visual, 6 emotions) from its prepared cache (`make prep-cremad`; docs/data.md)."""

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from onthefly.config import PositiveInt, configurable
from onthefly.data.clips import AudioClipCache, Resample


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
    resample: Resample = Resample.sinc

    def __post_init__(self) -> None:
        super().__post_init__()
        self.resample = Resample(self.resample)

    def audio_prep(self) -> dict[str, str]:
        return {**super().audio_prep(), "resample": self.resample.value}

    def prep_args(self) -> list[str]:
        args = super().prep_args()
        if self.split == "lists":
            args.append("SPLITS=/path/to/lists")
        elif self.split is not None and self.split != "random":
            args.append(f"SPLIT={self.split}")
        return args

    def recipe_checks(self) -> dict[str, tuple[Any, str]]:
        checks = super().recipe_checks()
        if self.split is not None:
            fix = "SPLITS=/path/to/lists" if self.split == "lists" else f"SPLIT={self.split}"
            checks["splits.mode"] = (self.split, fix)
        return checks
