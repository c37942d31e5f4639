"""Uni-modal scores s_m and the discrepancy ratio ρ_m (docs/method.md §2).

Pure tensor functions: no host sync, float32 whatever the autocast dtype. A data-parallel run all-reduces the
scores (pass ``all_reduce``) before the ratio is formed, so every rank computes the same ρ.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from onthefly.config import RhoReduce

EPS = 1e-8


def scores(
    unimodal_logits: Dict[str, torch.Tensor], labels: torch.Tensor, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """s_m = Σ_i w_i softmax(z_m,i)[y_i] (w_i = 1 unless ``weight`` [B] is given: 0 leaves sample i out), stacked in
    the dict's modality order -> [M] float32."""
    idx = labels.view(-1, 1)
    probs = [torch.softmax(z.detach().float(), dim=1).gather(1, idx).squeeze(1) for z in unimodal_logits.values()]
    if weight is not None:
        probs = [p * weight.to(p.dtype) for p in probs]
    return torch.stack([p.sum() for p in probs])


def ratios(s: torch.Tensor, reduce: RhoReduce | str = RhoReduce.pairwise, eps: float = EPS) -> torch.Tensor:
    """ρ from scores [M]: M = 2 gives s_1/s_2 and s_2/s_1; M > 2 uses ``reduce`` over the other modalities.

    pairwise: mean_j≠m s_m / s_j;  min: s_m / min_j≠m s_j;  sum_others: s_m / Σ_j≠m s_j.
    Divisions are guarded by ``eps``; a non-finite ratio (NaN scores) becomes 1 (no modulation).
    """
    s = s.float()
    m = s.shape[0]
    if m < 2:
        return torch.ones_like(s)
    others = ~torch.eye(m, dtype=torch.bool, device=s.device)  # [M, M], row m marks j != m
    reduce = RhoReduce(reduce)
    if reduce is RhoReduce.pairwise:
        pair = s[:, None] / (s[None, :] + eps)  # [m, j] = s_m / s_j
        rho = (pair * others).sum(dim=1) / (m - 1)
    elif reduce is RhoReduce.min:
        rho = s / (s[None, :].expand(m, m).masked_fill(~others, float("inf")).amin(dim=1) + eps)
    else:
        rho = s / ((s[None, :] * others).sum(dim=1) + eps)
    return torch.nan_to_num(rho, nan=1.0)


def discrepancy(
    unimodal_logits: Dict[str, torch.Tensor],
    labels: torch.Tensor,
    reduce: RhoReduce | str = RhoReduce.pairwise,
    all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [M], ρ [M]) for one batch; ``all_reduce`` sums the scores over data-parallel ranks; ``weight`` [B]
    weighs the samples (0: left out)."""
    s = scores(unimodal_logits, labels, weight)
    if all_reduce is not None:
        s = all_reduce(s)
    return s, ratios(s, reduce)
