"""Modulation methods: plug-ins that see the training loop only through the hooks of `base.Modulation`."""
from onthefly.modulation import baselines, mla, ogm, opm, opm_ogm, reconboost, relearning, valuation  # noqa: F401  (register schemas)
from onthefly.modulation.base import Modulation, NoModulation, StepContext  # noqa: F401
