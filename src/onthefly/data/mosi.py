"""CMU-MOSI (text + audio + visual feature sequences, sentiment in [-3, 3]) from its cache (`make prep-mosi`).

The cache (written by :mod:`data_prep.mosi` from a MulT or MMSA pickle) is a folder::

    recipe.json                   source file, source format, feature sizes, time steps, counts, code version
    index.csv                     one row per segment of the pickle: id, split, label, score, len_<modality>,
                                  row (its row in the split's arrays, -1 if skipped), source_row, status, reason
    <split>/<modality>.npy        float32 [N, T, D]: valid steps first (0 .. length-1), zeros after
    <split>/<modality>_lengths.npy  int64 [N]
    <split>/score.npy             float32 [N], the continuous sentiment score

Splits are ``train``, ``val`` (the pickle's ``valid``) and ``test``; modalities ``text``, ``audio`` and
``visual`` (the pickle's ``vision``). Training is 2-class (score >= 0 is positive, as in the lab's benchmark);
the score travels with every item for regression metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from onthefly.config import configurable
from onthefly.data.base import CacheDamagedError, DataSplits, EmptySplitError, require_cache
from onthefly.data.cache import (
    INDEX_FILE,
    RECIPE_FILE,
    SPLITS,
    CacheMismatchError,
    check_npy,
    index_counts,
    load_json,
    prep_command,
)

log = logging.getLogger("onthefly")

DATASET = "mosi"
FORMAT_VERSION = 1
MODALITIES = ("text", "audio", "visual")
CLASS_NAMES = ["negative", "positive"]


def array_path(root: Path, split: str, modality: str) -> Path:
    return Path(root) / split / f"{modality}.npy"


def lengths_path(root: Path, split: str, modality: str) -> Path:
    return Path(root) / split / f"{modality}_lengths.npy"


def score_path(root: Path, split: str) -> Path:
    return Path(root) / split / "score.npy"


def label_of(score: float) -> int:
    """The 2-class label: 1 (positive) for score >= 0, else 0."""
    return int(score >= 0)


class MOSISplit(Dataset):
    """One split: items {modality: {"x": float32 [T, D], "length": int64 scalar}, "label": int, "score": float32
    scalar, "index": int}. T is the stored length (cut to ``max_len``), the same for every item, so the default
    collate stacks a batch; steps at and after ``length`` are zeros."""

    def __init__(
        self,
        root: Path,
        split: str,
        modalities: Sequence[str],
        max_len: Optional[int] = None,
        stats: Optional[dict[str, tuple[np.ndarray, np.ndarray]]] = None,
    ):
        self.root, self.split = Path(root), split
        self.modalities = list(modalities)
        self.max_len = max_len
        self.stats = stats or {}
        self.scores = np.load(score_path(self.root, split)).astype(np.float32)
        self.lengths = {m: np.load(lengths_path(self.root, split, m)).astype(np.int64) for m in self.modalities}
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, modality: str) -> np.ndarray:
        arr = self._arrays.get(modality)
        if arr is None:  # opened lazily, in the process that reads (DataLoader workers included)
            arr = np.load(array_path(self.root, self.split, modality), mmap_mode="r")
            self._arrays[modality] = arr
        return arr

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for m in self.modalities:
            x = np.array(self.array(m)[i, : self.max_len], dtype=np.float32)  # a copy of the memory-mapped rows
            length = min(max(int(self.lengths[m][i]), 1), x.shape[0])
            if m in self.stats:
                mean, std = self.stats[m]
                x = (x - mean) / std
                x[length:] = 0.0
            item[m] = {"x": torch.from_numpy(x), "length": torch.tensor(length, dtype=torch.int64)}
        score = float(self.scores[i])
        item["label"] = label_of(score)
        item["score"] = torch.tensor(score, dtype=torch.float32)
        item["index"] = i
        return item

    def __getstate__(self):  # memory maps stay in the process that opened them
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


@configurable("dataset")
class MOSI:
    """CMU-MOSI from its prepared cache: per-modality feature sequences whose sizes come from the data
    (``encoder_args`` hands them to the encoders).

    ``max_len`` cuts every sequence to at most that many steps (None: as stored); ``normalise`` z-scores each
    feature with the mean and standard deviation of the train split's valid steps.
    """

    name = DATASET
    all_modalities = MODALITIES

    def __init__(
        self,
        root: str = "data/mosi",
        modalities: List[str] = ["text", "audio", "visual"],  # noqa: B006 (copied by the schema)
        max_len: Optional[int] = None,
        normalise: bool = False,
    ):
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"{DATASET} has modalities {list(MODALITIES)}; got {list(modalities)}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be at least 1 (or null: as stored), got {max_len}")
        self.root = Path(root)
        self.modalities = list(modalities)
        self.max_len = max_len
        self.normalise = normalise

    def open(self) -> dict[str, Any]:
        """The cache's recipe; a missing, unfinished, foreign or damaged cache fails with the prep command to run.
        Checks, without reading the arrays, that each one has the shape and file size recorded in recipe.json
        and that index.csv holds the segments the prep wrote."""
        command = prep_command(DATASET, self.root)
        rerun = (
            f"Run `{command}` again: it rebuilds a damaged cache from the pickle (or add ARGS=overwrite=true "
            "to rebuild it whatever its state)."
        )
        recipe = load_json(require_cache(self.root / RECIPE_FILE, command), rerun)
        if recipe.get("dataset") != DATASET or recipe.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{self.root} holds a {recipe.get('dataset')} cache of format {recipe.get('format_version')}; this "
                f"code reads {DATASET} format {FORMAT_VERSION}. Rebuild it with `{command} ARGS=overwrite=true`."
            )
        for split in SPLITS:
            for m in self.modalities:
                require_cache(array_path(self.root, split, m), f"{command} ARGS=overwrite=true")
        require_cache(self.root / INDEX_FILE, f"{command} ARGS=overwrite=true")
        try:
            for split in SPLITS:
                n = int(recipe["splits"][split])
                for m in self.modalities:
                    check_npy(
                        array_path(self.root, split, m),
                        f"{split} {m} features",
                        (n, int(recipe["max_len"][m]), int(recipe["dims"][m])),
                        "float32",
                    )
                    check_npy(lengths_path(self.root, split, m), f"{split} {m} lengths", (n,), "int64")
                check_npy(score_path(self.root, split), f"{split} scores", (n,), "float32")
        except CacheDamagedError as err:
            raise CacheDamagedError(f"The {DATASET} cache at {self.root} is damaged: {err} {rerun}") from None
        try:
            index = pd.read_csv(
                self.root / INDEX_FILE, dtype={"id": str, "split": str, "status": str}, keep_default_na=False
            )
            have = index_counts(index)
        except (ValueError, KeyError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise CacheDamagedError(f"{self.root / INDEX_FILE} is damaged ({err}). {rerun}") from None
        listed = sum(int(c["listed"]) for c in recipe["counts"].values())
        cached = {s: int(recipe["splits"][s]) for s in SPLITS}
        if have["rows"] != listed or have["ok"] != cached:
            raise CacheDamagedError(
                f"{self.root / INDEX_FILE} has {have['rows']} segments, usable per split {have['ok']}, where the prep "
                f"wrote {listed}, usable {cached} (recipe.json): rows were deleted or edited. {rerun}"
            )
        return recipe

    def _stats(self, train: MOSISplit) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-feature mean and std over the train split's valid steps (after the ``max_len`` cut)."""
        stats = {}
        for m in self.modalities:
            arr = train.array(m)
            total = np.zeros(arr.shape[2])
            squares = np.zeros(arr.shape[2])
            count = 0
            for start in range(0, len(arr), 256):  # in chunks: a split's array may be hundreds of MB
                x = np.asarray(arr[start : start + 256, : self.max_len], dtype=np.float64)
                lengths = np.clip(train.lengths[m][start : start + 256], 1, x.shape[1])
                mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
                valid = x[mask]
                total += valid.sum(0)
                squares += (valid**2).sum(0)
                count += len(valid)
            mean = total / max(count, 1)
            std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0.0))
            std[std < 1e-6] = 1.0  # a constant feature stays as it is, shifted to 0
            stats[m] = (mean.astype(np.float32), std.astype(np.float32))
        return stats

    def splits(self) -> DataSplits:
        recipe = self.open()
        parts = {s: MOSISplit(self.root, s, self.modalities, self.max_len) for s in SPLITS}
        for s in SPLITS:
            if len(parts[s]) == 0:
                raise EmptySplitError(
                    f"the {s} split is empty: the {DATASET} cache at {self.root} has no usable "
                    f"segment in split '{s}'; see the status and reason columns of its index.csv"
                )
        dims = {}
        for m in self.modalities:
            dims[m] = int(parts["train"].array(m).shape[2])
            if dims[m] != int(recipe["dims"][m]):
                raise CacheMismatchError(
                    f"{array_path(self.root, 'train', m)} has {dims[m]} features, recipe.json "
                    f"says {recipe['dims'][m]}: rebuild with `{prep_command(DATASET, self.root)} "
                    "ARGS=overwrite=true`"
                )
        if self.normalise:
            stats = self._stats(parts["train"])
            for part in parts.values():
                part.stats = stats
        log.info(
            "%s cache %s (%s release, %s): %s segments (train/val/test), dims %s",
            DATASET,
            self.root,
            recipe.get("source_format"),
            "aligned" if recipe.get("aligned") else "unaligned",
            "/".join(str(len(parts[s])) for s in SPLITS),
            dims,
        )
        return DataSplits(
            train=parts["train"],
            val=parts["val"],
            test=parts["test"],
            num_classes=2,
            modalities=list(self.modalities),
            class_names=list(CLASS_NAMES),
            encoder_args={m: {"in_dim": dims[m]} for m in self.modalities},
            targets=["score"],
            train_eval=None,
        )
