"""Diagnosing & Re-learning (Wei, Li, Feng, Hu; ECCV 2024), docs/method.md §13.

Training is the plain joint step. Every ``every`` epochs (at most ``times`` times) each encoder is diagnosed:
its features of the train split and of the held-out val split are clustered with k-means (K = the class count),
and the purity of the clusters (the share of samples in their cluster's majority class) is compared. A modality
whose train purity runs far ahead of its val purity has learnt its training data too well; it is pulled back
towards its initial weights, softly: θ_m ← w_m·θ_m⁰ + (1 - w_m)·θ_m with w_m = tanh(λ·|P_train - P_val|).
"""

from __future__ import annotations

import enum
import warnings
from typing import Dict, Optional

import torch

from onthefly.config import NonNegativeFloat, NonNegativeInt, PositiveInt, configurable
from onthefly.modulation.base import Modulation, StepContext


class TrainViews(str, enum.Enum):
    eval = "eval"  # the train split with evaluation transforms (deterministic views)
    augmented = "augmented"  # the training augmentation, as the official code extracts them (model in eval mode)


# --- the diagnosis, on plain tensors ----------------------------------------------------------------------------
def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Each column mapped linearly onto [-1, 1] by its own min and max (a constant column maps to -1)."""
    lo, hi = x.min(0).values, x.max(0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return (x - lo) / span * 2 - 1


def kmeans(
    x: torch.Tensor, k: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, seed: int = 0
) -> torch.Tensor:
    """Cluster ids [N] of the best (lowest inertia) of ``n_init`` Lloyd runs from k-means++ seeds, drawn from a
    generator seeded with ``seed``. ``tol``: stop when the centres move less than tol × the mean feature variance."""
    x = x.double()
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    threshold = tol * float(x.var(0, unbiased=False).mean())
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centres = x[torch.randint(n, (1,), generator=g)]
        for _ in range(1, k):  # k-means++: the next seed with probability ∝ squared distance to the nearest seed
            d2 = torch.cdist(x, centres).pow(2).min(1).values
            probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
            centres = torch.cat([centres, x[torch.multinomial(probs.cpu(), 1, generator=g).to(x.device)]])
        for _ in range(max_iter):
            assign = torch.cdist(x, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
            moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # an empty cluster keeps its centre
            shift = float((moved - centres).pow(2).sum())
            centres = moved
            if shift <= threshold:
                break
        d = torch.cdist(x, centres)
        assign = d.argmin(1)
        inertia = float(d.gather(1, assign[:, None]).pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def purity(clusters: torch.Tensor, labels: torch.Tensor) -> float:
    """Σ over clusters of the majority class's count, over N."""
    table = torch.zeros(int(clusters.max()) + 1, int(labels.max()) + 1, dtype=torch.long, device=clusters.device)
    table.index_put_((clusters, labels.to(clusters.device)), torch.ones_like(clusters), accumulate=True)
    return float(table.max(1).values.sum()) / len(labels)


def reinit_weight(train_purity: float, val_purity: float, lam: float) -> float:
    """w = tanh(λ·|P_train - P_val|)."""
    return float(torch.tanh(torch.tensor(lam * abs(train_purity - val_purity))))


@torch.no_grad()
def soft_reinit(params, initial, w: float) -> None:
    """In place: θ ← w·θ⁰ + (1 - w)·θ for each parameter and its initial value."""
    for p, p0 in zip(params, initial):
        p.mul_(1 - w).add_(p0.to(p.device, p.dtype), alpha=w)


@torch.no_grad()
def _same_first_batch(a, b) -> bool:
    """True when two hook-loader iterators start with identical batches (labels and every input)."""
    first_a, first_b = next(a, None), next(b, None)
    if first_a is None or first_b is None:
        return False
    (xa, ya), (xb, yb) = first_a, first_b
    if ya.shape != yb.shape or not torch.equal(ya, yb):
        return False
    return all(torch.is_tensor(xa[k]) and torch.equal(xa[k], xb[k]) for k in xa if k in xb)


@configurable("modulation")
class Relearning(Modulation):
    """Diagnosing & Re-learning: k-means purity of each encoder's features on train vs val every ``every`` epochs
    (at most ``times`` times), then a soft re-initialisation of each encoder (docs/method.md §13)."""

    def __init__(
        self,
        lam: NonNegativeFloat = 3.0,
        every: PositiveInt = 20,
        times: NonNegativeInt = 3,
        train_views: TrainViews = TrainViews.eval,
        max_batches: Optional[PositiveInt] = None,
        n_init: PositiveInt = 10,
        max_iter: PositiveInt = 300,
        seed: NonNegativeInt = 0,
    ):
        self.lam, self.every, self.times = float(lam), int(every), int(times)
        self.train_views, self.max_batches = TrainViews(train_views), max_batches
        self.n_init, self.max_iter, self.seed = int(n_init), int(max_iter), int(seed)
        self.initial: Dict[str, list[torch.Tensor]] = {}
        self.events = 0
        self.encoders = None

    def setup(self, model, num_classes: int) -> None:
        self.num_classes = num_classes
        self.encoders = model.encoders
        self.initial = {m: [p.detach().cpu().clone() for p in enc.parameters()] for m, enc in model.encoders.items()}

    def train_start(self, ctx: StepContext) -> None:
        if _same_first_batch(ctx.batches("val", 1), ctx.batches("test", 1)):
            raise ValueError(
                "Diagnosing & Re-learning compares train with a held-out val split, but this run's val split is its "
                "test split (the dataset has no val split and dataset.val_fraction=0): the diagnosis would train on "
                "the test set. Set dataset.val_fraction (e.g. 0.1) to carve val from train."
            )

    @torch.no_grad()
    def _features(self, ctx: StepContext, split: str):
        model = ctx.model
        was_training = model.training
        model.eval()
        feats, labels = {m: [] for m in ctx.modalities}, []
        for inputs, y in ctx.batches(split, self.max_batches):
            encoded = model.encode(inputs)
            for m in ctx.modalities:
                feats[m].append(encoded[m].float())
            labels.append(y)
        model.train(was_training)
        return {m: torch.cat(f) for m, f in feats.items()}, torch.cat(labels)

    def diagnose(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """The purity of k-means clusters (K = class count) of min-max scaled features."""
        clusters = kmeans(minmax_scale(feats.float()), self.num_classes, self.n_init, self.max_iter, seed=self.seed)
        return purity(clusters, labels)

    def epoch_end(self, ctx: StepContext) -> None:
        if ctx.epoch == 0 or ctx.epoch % self.every or self.events >= self.times:
            return
        self.events += 1
        train_split = "train_eval" if self.train_views is TrainViews.eval else "train"
        train, ytrain = self._features(ctx, train_split)
        val, yval = self._features(ctx, "val")
        for m in ctx.modalities:
            p_train, p_val = self.diagnose(train[m], ytrain), self.diagnose(val[m], yval)
            w = reinit_weight(p_train, p_val, self.lam)
            soft_reinit(list(self.encoders[m].parameters()), self.initial[m], w)
            ctx.metrics[f"purity_train_{m}"] = torch.tensor(p_train)
            ctx.metrics[f"purity_val_{m}"] = torch.tensor(p_val)
            ctx.metrics[f"reinit_{m}"] = torch.tensor(w)
        if len(ytrain) < 2 * self.num_classes or len(yval) < 2 * self.num_classes:
            warnings.warn(
                f"re-learning diagnosed {len(ytrain)} train and {len(yval)} val samples for "
                f"{self.num_classes} clusters: the purities are noisy",
                stacklevel=2,
            )

    def state_dict(self) -> dict:
        return {"initial": self.initial, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.initial = state.get("initial", self.initial)
        self.events = int(state.get("events", 0))
