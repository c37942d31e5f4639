"""The `variant` switch of the methods whose published code and BalanceBenchmark's re-implementation differ."""
from __future__ import annotations

import enum


class Variant(str, enum.Enum):
    official = "official"  # as the authors released it (the default)
    balancebenchmark = "balancebenchmark"  # as BalanceBenchmark (2025) runs it, to reproduce its numbers
