"""Pieces the zoo methods share: the `variant` switch of the methods whose released code and BalanceBenchmark's
re-implementation differ, and a mean over data-parallel ranks for the statistics a method's decision reads."""

from __future__ import annotations

import enum

import torch
import torch.distributed as dist


class Variant(str, enum.Enum):
    official = "official"  # as the authors released it (the default)
    balancebenchmark = "balancebenchmark"  # as BalanceBenchmark (2025) runs it, to reproduce its numbers


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the data-parallel ranks (``t`` itself in one process). A coefficient that scales
    the all-reduced gradient must be the same on every rank, or the replicas drift apart."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()
