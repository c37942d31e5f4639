"""Loaders and samplers: how a split becomes batches, in one process or sharded over data-parallel ranks.

Training order is a function of (seed, epoch) only, and every item's random draws (crops, flips, frame choice)
come from a generator seeded by (seed, epoch, index): a run gives the same numbers whatever the number of loader
workers or ranks, and after a resume mid-epoch (``EpochSampler.start``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

_MIX = 1_000_003  # a prime, to mix (seed, epoch, index) into one seed


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a seed, an epoch, an index, a phase...)."""
    seed = 0
    for p in parts:
        seed = (seed * _MIX + int(p)) % (2**63)
    return seed


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (a permutation from seed + epoch, padded to equal shards), yielding
    ``(epoch, index)`` keys for :class:`SampleSeeded`, and able to start ``start`` samples into this rank's shard
    (a mid-epoch resume). Also used in a single process (num_replicas=1), so a run's sample order depends only
    on the seed and the epoch. ``indices``: the samples of an epoch (repeats allowed) when a method re-samples the
    training set; the permutation then runs over that list."""

    def __init__(
        self,
        dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        indices: Optional[Sequence[int]] = None,
    ):
        self.indices = None if indices is None else [int(i) for i in indices]
        super().__init__(
            dataset if self.indices is None else self.indices,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, chosen = self.epoch, list(super().__iter__())[self.start :]
        if self.indices is not None:
            chosen = [self.indices[i] for i in chosen]
        return iter([(epoch, i) for i in chosen])

    def __len__(self) -> int:
        return self.num_samples - self.start


class SampleSeeded(Dataset):
    """Items addressed by ``(epoch, index)``; the item's random draws (e.g. a random crop) come from torch's CPU
    generator seeded by (seed, epoch, index). Augmentation thus does not depend on the number of workers, the
    rank, or a resume, and the caller's generator state is left as it was.

    Contract for datasets: per-item randomness draws from torch's generator (as FrameTransform and
    onthefly.data.sampling do), not from `random` or `numpy.random`, which are not re-seeded per item (seeding
    and restoring all three cost ~0.25 ms per item, ~10 % of a CPU demo run)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        """The item of ``(epoch, index)``. An index past the end, ``i + k * len`` (a method's tagged copy of sample
        i, see ``Modulation.train_indices``), reads sample i and reports the tagged index."""
        epoch, index = key
        state = torch.get_rng_state()  # CPU generator only: CUDA streams stay untouched
        torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
        try:
            item = self.dataset[index % len(self.dataset)]
        finally:
            torch.set_rng_state(state)
        if index >= len(self.dataset):
            item = {**item, "index": index}
        return item


@dataclass
class LoaderOptions:
    """How batches are loaded (the trainer's settings of the same names)."""

    num_workers: int = 0
    prefetch_factor: Optional[int] = None
    pin_memory: bool = False  # page-locked batches (CUDA only)


def loader(
    dataset,
    batch_size: int,
    options: LoaderOptions,
    seed: int,
    sampler=None,
    shuffle: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with the run's worker settings; its own generator, so creating an iterator never draws from
    the global RNG (an exact resume needs that)."""
    workers = options.num_workers
    extra = {"prefetch_factor": options.prefetch_factor} if workers > 0 and options.prefetch_factor else {}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=options.pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
        **extra,
    )


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int, device: torch.device):
    """A plain loader (analyses, probes). Training uses :func:`run_loaders` (sharded, resumable)."""
    return loader(dataset, batch_size, LoaderOptions(num_workers, None, device.type == "cuda"), seed, shuffle=shuffle)


@dataclass
class RunLoaders:
    """A run's loaders: train (sharded, shuffled per epoch, resumable), val and test (sharded in order)."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    train_sampler: EpochSampler
    local_batch: int

    def __getitem__(self, split: str) -> DataLoader:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


def train_loader(
    train,
    seed: int,
    local_batch: int,
    options: LoaderOptions,
    world_size: int = 1,
    rank: int = 0,
    indices: Optional[Sequence[int]] = None,
) -> tuple[DataLoader, EpochSampler]:
    """The training loader of one rank (shuffled per epoch, resumable, per-sample seeded) and its sampler."""
    sampler = EpochSampler(train, world_size, rank, seed, indices=indices)
    # a trailing batch of one clip would break BatchNorm in training: drop it (and only it)
    return loader(
        SampleSeeded(train, seed), local_batch, options, seed, sampler, drop_last=sampler.num_samples % local_batch == 1
    ), sampler


def run_loaders(
    splits, seed: int, batch_size: int, eval_batch_size: int, options: LoaderOptions, world_size: int = 1, rank: int = 0
) -> RunLoaders:
    """The loaders of one rank. ``batch_size`` is the global batch (each of the ``world_size`` ranks takes its
    share); evaluation is sharded in order (DistributedSampler without shuffling) when there are several ranks."""
    if batch_size % world_size:
        raise ValueError(
            f"trainer.batch_size={batch_size} is the global batch: it must divide by the "
            f"{world_size} data-parallel ranks"
        )
    local = batch_size // world_size
    train, sampler = train_loader(splits["train"], seed, local, options, world_size, rank)
    eval_batch = -(-eval_batch_size // world_size)

    def in_order(dataset):
        if world_size == 1:
            return None
        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)

    return RunLoaders(
        train=train,
        val=loader(splits["val"], eval_batch, options, seed, in_order(splits["val"])),
        test=loader(splits["test"], eval_batch, options, seed, in_order(splits["test"])),
        train_sampler=sampler,
        local_batch=local,
    )
