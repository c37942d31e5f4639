"""Sample- and modality-level modality valuation (Wei, Feng, Wang, Hu; CVPR 2024: "Enhancing multimodal
cooperation via sample-level modality valuation"), docs/method.md §14; and the Shapley-value core that the
run-level imbalance metrics share (onthefly.engine.imbalance).

After each epoch (from ``warmup - 1`` on) every training sample is valued without gradient: the fused prediction
is made with each subset S of the modalities kept (the others' features zeroed), v(S) = |S|·1[correct], and each
modality's Shapley value φ_m says how much it contributed to that sample. The next epoch's training set is the
whole split plus extra copies that keep only a low-contribution modality (its partners' features zeroed in the
forward pass), so the model has to learn from it:

* ``level: sample``: sample i gets 3, 2, 1 or 0 copies keeping only modality m as φ_m < -0.1, < 0.4, < 0.9, else;
* ``level: modality``: the mean contributions c̄_m over a random part of the set give gaps g_m = 1 - c̄_m;
  ⌊d·N⌋ random samples, d = α·(2/3)·(max g - min g) (``growth`` tanh / square variants), are added keeping only
  the modality with the largest gap.

The copies are tagged train indices (``i + k·N``, see ``Modulation.train_indices``): tag k = 1 + m + M·r keeps
only modality m (r numbers repeats, so each copy gets its own augmentation).
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from onthefly.config import NonNegativeFloat, NonNegativeInt, PositiveInt, Range, SampleValue, configurable
from onthefly.modulation.base import Modulation, StepContext


def shapley_matrix(num_modalities: int) -> torch.Tensor:
    """A [2^M, M] matrix C with φ = v @ C for values v indexed by subset bitmask (bit m set: modality m kept):
    C[S, m] = w(|S|-1) if m ∈ S else -w(|S|), with w(s) = s!(M-s-1)!/M!."""
    m_count = num_modalities
    weight = [math.factorial(s) * math.factorial(m_count - s - 1) / math.factorial(m_count) for s in range(m_count)]
    coef = torch.zeros(2**m_count, m_count, dtype=torch.float64)
    for subset in range(2**m_count):
        size = bin(subset).count("1")
        for m in range(m_count):
            if subset >> m & 1:
                coef[subset, m] = weight[size - 1]
            elif size < m_count:
                coef[subset, m] = -weight[size]
    return coef


def subset_sizes(num_modalities: int) -> torch.Tensor:
    return torch.tensor([bin(s).count("1") for s in range(2**num_modalities)], dtype=torch.float64)


def keep_only(feats: Dict[str, torch.Tensor], modalities: Sequence[str], subset: int) -> Dict[str, torch.Tensor]:
    """The features with every modality outside ``subset`` (bitmask over ``modalities``) zeroed; other entries
    (context inputs, side targets) kept."""
    out = dict(feats)
    for i, m in enumerate(modalities):
        if not subset >> i & 1:
            out[m] = torch.zeros_like(feats[m])
    return out


@torch.no_grad()
def subset_correct(
    head: nn.Module,
    feats: Dict[str, torch.Tensor],
    labels: torch.Tensor,
    class_logits: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """[N, 2^M] bool: is the fused prediction right when only the subset's modalities are kept (2^M head passes
    over cached features)."""
    modalities = list(head.modalities)
    cols = [
        class_logits(head(keep_only(feats, modalities, s))).argmax(1) == labels for s in range(2 ** len(modalities))
    ]
    return torch.stack(cols, dim=1)


def sample_shapley(correct: torch.Tensor, sample_value: SampleValue | str = SampleValue.scaled) -> torch.Tensor:
    """[N, M] per-sample Shapley values from :func:`subset_correct`'s table (v_i(∅) = 0)."""
    m_count = int(math.log2(correct.shape[1]))
    values = correct.double()
    if SampleValue(sample_value) is SampleValue.scaled:
        values = values * subset_sizes(m_count).to(correct.device)
    values[:, 0] = 0.0
    return values @ shapley_matrix(m_count).to(correct.device)


# --- re-sampling plans ------------------------------------------------------------------------------------------
class Level(str, enum.Enum):
    sample = "sample"  # per-sample copies by each sample's contributions
    modality = "modality"  # copies of random samples by the modalities' mean contributions


class Growth(str, enum.Enum):
    linear = "linear"  # d = α·(2/3)·gap difference
    tanh = "tanh"  # d = tanh(α·(2/3)·gap difference)
    square = "square"  # d = α·((2/3)·gap difference)^1.5


class TrainViews(str, enum.Enum):
    eval = "eval"  # the train split with evaluation transforms
    augmented = "augmented"  # the training augmentation (the official valuation pass)


def sample_copies(phi: torch.Tensor) -> torch.Tensor:
    """Copies per (sample, modality) keeping only that modality: 3 where φ < -0.1, 2 where φ < 0.4, 1 where
    φ < 0.9, else 0 (for two modalities and v(S) = |S|·correct: φ = -0.5, 0, 0.5 -> 3, 2, 1 copies)."""
    return 3 - torch.bucketize(phi, torch.tensor([-0.1, 0.4, 0.9], dtype=phi.dtype, device=phi.device), right=True)


def modality_extra(mean_phi: torch.Tensor, alpha: float, growth: Growth | str) -> tuple[float, int]:
    """(d, index of the modality to keep) from the mean contributions: gaps g = 1 - c̄, spread = (2/3)·(max g -
    min g); d = α·spread (linear), tanh(α·spread) (tanh) or α·spread^1.5 (square); keep the largest gap."""
    gaps = 1.0 - mean_phi
    spread = float(gaps.max() - gaps.min()) / 3 * 2
    growth = Growth(growth)
    if growth is Growth.linear:
        d = alpha * spread
    elif growth is Growth.tanh:
        d = math.tanh(alpha * spread)
    else:
        d = spread**1.5 * alpha
    return d, int(gaps.argmax())


def tag(indices: torch.Tensor, keep: torch.Tensor, n: int, m_count: int) -> torch.Tensor:
    """Tagged train indices i + N·(1 + keep + M·r), r the rank of each (i, keep) pair among its repeats."""
    pair = indices * m_count + keep
    order = torch.argsort(pair, stable=True)
    ranked = pair[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    starts = torch.cummax(torch.where(first, torch.arange(len(ranked)), torch.zeros_like(ranked)), 0).values
    rank = torch.empty_like(pair)
    rank[order] = torch.arange(len(ranked)) - starts
    return indices + n * (1 + keep + m_count * rank)


def kept_modality(tagged: torch.Tensor, n: int, m_count: int) -> torch.Tensor:
    """For each tagged index: -1 (an original sample: every modality kept) or the one modality its copy keeps."""
    k = torch.div(tagged, n, rounding_mode="floor")
    return torch.where(k > 0, (k - 1) % m_count, torch.full_like(k, -1))


@configurable("modulation")
class Valuation(Modulation):
    """Sample- or modality-level valuation with epoch-end re-sampling of the training set (docs/method.md §14)."""

    def __init__(
        self,
        level: Level = Level.sample,
        warmup: NonNegativeInt = 5,
        alpha: NonNegativeFloat = 1.0,
        part_ratio: Annotated[float, Range(gt=0, le=1)] = 0.2,
        growth: Growth = Growth.linear,
        sample_value: SampleValue = SampleValue.scaled,
        train_views: TrainViews = TrainViews.eval,
        max_batches: Optional[PositiveInt] = None,
        seed: NonNegativeInt = 0,
    ):
        self.level, self.warmup, self.alpha = Level(level), int(warmup), float(alpha)
        self.part_ratio, self.growth, self.sample_value = float(part_ratio), Growth(growth), SampleValue(sample_value)
        self.train_views, self.max_batches, self.seed = TrainViews(train_views), max_batches, int(seed)
        self.plan: Optional[torch.Tensor] = None  # the tagged train indices of epoch plan_epoch on
        self.plan_epoch = 0

    def setup(self, model, num_classes: int) -> None:
        if len(model.modalities) < 2:
            raise ValueError(f"modality valuation needs several modalities; this model has only {model.modalities}")

    def train_indices(self, epoch: int):
        return None if self.plan is None or epoch < self.plan_epoch else self.plan.tolist()

    def on_features(self, ctx: StepContext) -> None:
        if self.plan is None or ctx.epoch < self.plan_epoch or ctx.indices is None:
            return
        keep = kept_modality(ctx.indices, ctx.train_size, len(ctx.modalities))
        feats = dict(ctx.features)
        for j, m in enumerate(ctx.modalities):
            drop = ((keep >= 0) & (keep != j))[:, None]
            feats[m] = torch.where(drop, torch.zeros_like(feats[m]), feats[m])
        ctx.features = feats

    @torch.no_grad()
    def value(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices [n], per-sample Shapley values [n, M]) of the train split, model in eval mode."""
        model = ctx.model
        was_training = model.training
        model.eval()
        split = "train_eval" if self.train_views is TrainViews.eval else "train"
        feats: Dict[str, list] = {m: [] for m in ctx.modalities}
        kept = {k: [] for k in ("labels", "index")}
        for inputs, labels, index in ctx.batches(split, self.max_batches, True):
            encoded = model.encode(inputs)
            for m in ctx.modalities:
                feats[m].append(encoded[m])
            for k in encoded:
                if k not in feats:
                    feats.setdefault(k, []).append(encoded[k])
            kept["labels"].append(labels)
            kept["index"].append(index)
        model.train(was_training)
        feats = {k: torch.cat(v) for k, v in feats.items()}
        labels, index = torch.cat(kept["labels"]), torch.cat(kept["index"])
        original = index < ctx.train_size  # the augmented loader may hold this epoch's copies: value each sample once
        feats, labels, index = {k: v[original] for k, v in feats.items()}, labels[original], index[original]
        correct = subset_correct(model.head, feats, labels, lambda z: z)
        return index.cpu(), sample_shapley(correct, self.sample_value).cpu()

    def epoch_end(self, ctx: StepContext) -> None:
        if ctx.epoch < self.warmup - 1:
            return
        index, phi = self.value(ctx)
        n, m_count = ctx.train_size, len(ctx.modalities)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.epoch)
        if self.level is Level.sample:
            copies = sample_copies(phi)  # [n, M]
            keep = torch.arange(m_count).expand_as(copies)
            chosen = torch.repeat_interleave(index[:, None].expand_as(copies).reshape(-1), copies.reshape(-1))
            keep = torch.repeat_interleave(keep.reshape(-1), copies.reshape(-1))
        else:
            part = torch.randint(len(index), (max(1, int(self.part_ratio * len(index))),), generator=g)
            d, m_keep = modality_extra(phi[part].mean(0), self.alpha, self.growth)
            chosen = torch.randint(n, (int(d * n),), generator=g)
            keep = torch.full_like(chosen, m_keep)
        extra = tag(chosen, keep, n, m_count)
        self.plan, self.plan_epoch = torch.cat([torch.arange(n), extra]), ctx.epoch + 1
        ctx.log_per_modality("phi", phi.mean(0).float())
        ctx.log_per_modality("copies", torch.bincount(keep, minlength=m_count).float())
        ctx.metrics["epoch_size"] = torch.tensor(float(len(self.plan)))

    def state_dict(self) -> dict:
        return {"plan": self.plan, "plan_epoch": self.plan_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.plan, self.plan_epoch = state.get("plan"), int(state.get("plan_epoch", 0))
