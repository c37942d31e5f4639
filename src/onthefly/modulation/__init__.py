"""Modulation methods: plug-ins that see the training loop only through the hooks of `base.Modulation`."""
from onthefly.modulation import baselines, greedy, ogm, opm, opm_ogm  # noqa: F401  (register schemas)
from onthefly.modulation import agm, mmcosine, mmpareto, pmr, umt  # noqa: F401  (register schemas: zoo, part 1a)
from onthefly.modulation import amco, cml, inforeg, lfm, mbsd  # noqa: F401  (register schemas: zoo, part 1b)
from onthefly.modulation import mla, reconboost, relearning, valuation  # noqa: F401  (zoo, part 2)
from onthefly.modulation.base import Modulation, NoModulation, StepContext  # noqa: F401
