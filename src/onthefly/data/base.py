"""What every dataset builder hands the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import Dataset


class DataError(Exception):
    """Data that cannot be used as asked; the message names the file or setting and what to do about it."""


class CacheMissingError(DataError, FileNotFoundError):
    """A dataset cache is absent or stale; the message names the command that makes it."""


class CacheDamagedError(CacheMissingError):
    """A cache whose files do not hold what its index says (cut, garbled or edited); the message names the file,
    the clips it holds and the command that repairs it."""


class EmptySplitError(DataError, ValueError):
    """A train / val / test split that ends up with no sample; the message names the split and the setting (or
    the cache) that emptied it."""


def require_cache(path: Path, prep_command: str) -> Path:
    """Return ``path`` if it exists, else fail with one line naming the prep command and ONTHEFLY_DATA."""
    path = Path(path)
    if not path.exists():
        raise CacheMissingError(
            f"No dataset cache at {path}. Build it with `{prep_command}`, or point paths.data_root "
            f"(env ONTHEFLY_DATA) at the folder that holds it."
        )
    return path


@dataclass
class DataSplits:
    """train / val / test datasets yielding dicts {modality: input, ..., "label": int, "index": int}.

    An input is a tensor, or a dict of tensors (a feature sequence: {"x": [T, D], "length": int}; a question:
    {"tokens": [L], "length": int, ...}); the default collate stacks both.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    modalities: list[str]
    class_names: list[str] = field(default_factory=list)
    train_eval: Optional[Dataset] = None  # the train split with evaluation transforms (linear probe); None: train
    # --- what datasets beyond plain clip classification declare (CMU-MOSI, AVQA) ---
    # arguments read from the data that each encoder needs at build time, by input key
    # (MOSI: {"text": {"in_dim": 300}, ...}; AVQA: {"question": {"vocab_size": 1234}})
    encoder_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    # input keys that are encoded but not balanced: context for the head (AVQA: ["question"])
    context: list[str] = field(default_factory=list)
    # extra per-sample targets the task reads besides "label" (MOSI: ["score"]; AVQA: ["qtype", "relation"])
    targets: list[str] = field(default_factory=list)
    # the value names of categorical targets ({"qtype": ["Which", "Come From", ...], ...})
    target_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def probe_train(self) -> Dataset:
        return self.train_eval if self.train_eval is not None else self.train

    def __getitem__(self, split: str) -> Dataset:
        return {"train": self.train, "val": self.val, "test": self.test}[split]
