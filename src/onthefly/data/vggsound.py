"""VGGSound (audio + visual, 309 classes) from its prepared cache (`make prep-vggsound`, shardable)."""

from dataclasses import dataclass
from typing import Annotated, ClassVar, Optional

from onthefly.config import Range, configurable
from onthefly.data.clips import AudioClipCache


@configurable("dataset")
@dataclass(eq=False)
class VGGSound(AudioClipCache):
    """VGGSound: the whole-clip 129 x 1,251 log spectrogram is cached; each sample takes ``audio_crop`` frames
    (626 = 5 s): a random window in training, the centre in evaluation. Ten 1-fps frames cached, 3 used.
    """

    name: ClassVar[str] = "vggsound"
    all_modalities: ClassVar[tuple[str, ...]] = ("audio", "visual")

    root: str = "data/vggsound"
    audio_recipe: str = "ogm_ge"
    audio_crop: Annotated[Optional[int], Range(ge=1)] = 626
