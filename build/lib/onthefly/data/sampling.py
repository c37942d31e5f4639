"""Which of a clip's cached 1-fps frames a sample uses (DATA.md: decided at load time, not at prep time).

* ``segments`` (default): split the n frames into T equal segments; training takes a random frame in each,
  evaluation each segment's centre, so evaluation is deterministic.
* ``spread``: T frames evenly spread from the first to the last (T = 3: first, middle, last), in training and
  evaluation alike (the journal code's Kinetics-Sounds frames).

With fewer frames than T, segments are shorter than a frame and frames repeat.
"""
from __future__ import annotations

import enum
from typing import Optional

import torch


class Sampling(str, enum.Enum):
    segments = "segments"
    spread = "spread"


def frame_indices(n: int, t: int, train: bool, mode: Sampling | str = Sampling.segments,
                  generator: Optional[torch.Generator] = None) -> list[int]:
    """T frame indices in [0, n), in time order."""
    if n < 1 or t < 1:
        raise ValueError(f"need at least one frame and one sample, got n={n}, t={t}")
    mode = Sampling(mode)
    if mode is Sampling.spread:
        if t == 1:
            return [(n - 1) // 2]
        return [round(k * (n - 1) / (t - 1)) for k in range(t)]
    length = n / t
    if train:
        offsets = torch.rand(t, generator=generator).tolist()
    else:
        offsets = [0.5] * t
    return [min(n - 1, int(length * (k + u))) for k, u in enumerate(offsets)]


def crop_start(total: int, size: int, train: bool, generator: Optional[torch.Generator] = None) -> int:
    """Start of a window of ``size`` within ``total``: random in training, centred in evaluation."""
    room = max(0, total - size)
    if train:
        return int(torch.randint(0, room + 1, (1,), generator=generator))
    return room // 2
