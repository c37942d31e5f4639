"""Which of a clip's cached 1-fps frames a sample uses (docs/data.md: decided at load time, not at prep time).

* ``segments`` (default): split the n frames into T equal segments; training takes a random frame in each,
  evaluation each segment's centre, so evaluation is deterministic.
* ``spread``: T frames evenly spread from the first to the last (T = 3: first, middle, last), in training and
  evaluation alike (what the journal's text describes for Kinetics-Sounds).

The released loaders' choices (docs/method.md §9; ``fidelity=official`` selects them), fixed in training and
evaluation alike:

* ``first``: the first T frames (0, 1, ..., T - 1). The CVPR CREMA-D and VGGSound loaders draw a random index but
  then load the first T entries of an unsorted directory listing: one fixed, arbitrary set of frames per clip.
  The listing's order cannot be reproduced, so the first T frames in time order stand in for it.
* ``segment_starts``: frame k * floor(n / T) for k = 0..T-1 (the CVPR Kinetics-Sounds loader).
* ``spread_shifted``: the journal's Kinetics-Sounds loader reads its frame list shifted by one (entry i holds frame
  i - 1, the first entry the last frame) and then takes entries 0, floor((n - 1) / 2) and n - 1: the last frame,
  the middle one minus one and the second-to-last (for other T, entries floor(k (n - 1) / (T - 1))).

With fewer frames than T, segments are shorter than a frame and frames repeat.
"""

from __future__ import annotations

import enum
from typing import Optional

import torch


class Sampling(str, enum.Enum):
    segments = "segments"
    spread = "spread"
    first = "first"
    segment_starts = "segment_starts"
    spread_shifted = "spread_shifted"


FIXED = (Sampling.spread, Sampling.first, Sampling.segment_starts, Sampling.spread_shifted)  # no randomness


def frame_indices(
    n: int, t: int, train: bool, mode: Sampling | str = Sampling.segments, generator: Optional[torch.Generator] = None
) -> list[int]:
    """T frame indices in [0, n), in time order (``spread_shifted``: in the released loader's order)."""
    if n < 1 or t < 1:
        raise ValueError(f"need at least one frame and one sample, got n={n}, t={t}")
    mode = Sampling(mode)
    if mode is Sampling.spread:
        if t == 1:
            return [(n - 1) // 2]
        return [round(k * (n - 1) / (t - 1)) for k in range(t)]
    if mode is Sampling.first:
        return [min(k, n - 1) for k in range(t)]
    if mode is Sampling.segment_starts:
        return [min(k * (n // t), n - 1) for k in range(t)]
    if mode is Sampling.spread_shifted:
        entries = [(n - 1) // 2] if t == 1 else [k * (n - 1) // (t - 1) for k in range(t)]
        return [(e - 1) % n for e in entries]
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
