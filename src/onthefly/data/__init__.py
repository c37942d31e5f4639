"""Datasets over caches (and the built-in synthetic benchmark), transforms and frame sampling."""

from onthefly.data import (  # noqa: F401  (real datasets over caches)
    avqa,  # noqa: F401
    cremad,
    kinetics_sounds,
    mosi,  # noqa: F401
    synth_av,  # noqa: F401  (registers the dataset schemas)
    ucf101,
    vggsound,
)
from onthefly.data.base import DataSplits  # noqa: F401
