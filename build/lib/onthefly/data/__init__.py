"""Datasets over caches (and the built-in synthetic benchmark), transforms and frame sampling."""
from onthefly.data import synth_av  # noqa: F401  (registers the dataset schemas)
from onthefly.data import cremad, kinetics_sounds, ucf101, vggsound  # noqa: F401  (real datasets over caches)
from onthefly.data import avqa  # noqa: F401
from onthefly.data import mosi  # noqa: F401
from onthefly.data.base import DataSplits  # noqa: F401
