"""Modulation methods: plug-ins that see the training loop only through the hooks of `base.Modulation`."""

from onthefly.modulation import (  # noqa: F401  (register schemas)  # noqa: F401  (register schemas: zoo, part 1a)  # noqa: F401  (register schemas: zoo, part 1b)  # noqa: F401  (zoo, part 2)
    agm,
    amco,
    baselines,
    cml,
    greedy,
    inforeg,
    lfm,
    mbsd,
    mla,
    mmcosine,
    mmpareto,
    ogm,
    opm,
    opm_ogm,
    pmr,
    reconboost,
    relearning,
    umt,
    valuation,
)
from onthefly.modulation.base import Modulation, NoModulation, StepContext  # noqa: F401
