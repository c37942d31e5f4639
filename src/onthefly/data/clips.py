"""Datasets over a prepared cache (the readers of `cremad`, `kinetics_sounds`, `vggsound`, `ucf101`).

Every sample is read from the cache with no video decoding: a memory-mapped spectrogram row (cropped at load
time where the recipe says so) and T JPEG frames chosen by :mod:`onthefly.data.sampling`, decoded and put
through the train or evaluation frame transform. UCF-101's RGB and optical flow share one crop and one flip
(the flip negates the horizontal flow u).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from onthefly.data.base import DataSplits
from onthefly.data.cache import OK, CacheReader, audio_recipe
from onthefly.data.sampling import Sampling, crop_start, frame_indices
from onthefly.data.transforms import IMAGENET_MEAN, IMAGENET_STD, FrameTransform, random_resized_crop_box

log = logging.getLogger("onthefly")

FLOW_MEAN, FLOW_STD = 0.5, 0.226  # flow JPEGs: 128 = no motion; (x / 255 - 0.5) / 0.226, so a flip negates u exactly


def decode_frames(jpegs: Sequence[bytes], gray: bool = False) -> torch.Tensor:
    """JPEG bytes -> uint8 [T, C, H, W] (C = 3, or 1 with ``gray``), decoded by Pillow (libjpeg-turbo).

    (torchvision's JPEG codec is deprecated since 0.29; Pillow's is as fast and comes with torchvision anyway.)
    """
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("L" if gray else "RGB")) for b in jpegs]
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if gray else x.permute(0, 3, 1, 2)


class RGBFlowTransform:
    """UCF-101's streams under one crop box and one flip (DATA.md): uint8 RGB [T, 3, H, W], optional flow
    [T, 2, h, w] and optional next-frame RGB [T, 3, H, W] -> normalised float RGB [T, 3, S, S], flow
    [T, 2, S, S] and RGB difference (next - current, TSN style) [T, 3, S, S] (None where not given).

    A horizontal flip mirrors every stream and negates u (motion to the right becomes motion to the left).
    """

    def __init__(self, train: bool, size: int, scale: tuple[float, float] = (0.08, 1.0)):
        self.train, self.size, self.scale = train, size, tuple(scale)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def __call__(self, rgb: torch.Tensor, flow: Optional[torch.Tensor] = None, rgb_next: Optional[torch.Tensor] = None):
        height, width = rgb.shape[-2:]
        parts = [rgb.float()]
        if flow is not None:
            flow = flow.float()
            if flow.shape[-2:] != (height, width):  # flow rendered at another size: bring it onto the RGB grid
                flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            parts.append(flow)
        if rgb_next is not None:
            parts.append(rgb_next.float())
        x = torch.cat(parts, dim=1)
        if self.train:
            top, left, h, w = random_resized_crop_box(height, width, self.scale)
            x = x[..., top : top + h, left : left + w]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.train and torch.rand(()).item() < 0.5:
            x = x.flip(-1)
            if flow is not None:
                x[:, 3] = 255.0 - x[:, 3]  # u points the other way in a mirrored image
        rgb_out = (x[:, :3] - self.mean) / self.std
        flow_out = (x[:, 3:5] / 255.0 - FLOW_MEAN) / FLOW_STD if flow is not None else None
        diff = (x[:, -3:] - x[:, :3]) / 255.0 / FLOW_STD if rgb_next is not None else None
        return rgb_out, flow_out, diff


class CachedClips(Dataset):
    """One split of a cache: items {modality: tensor, "label": int, "index": int}.

    audio: float32 [1, *shape] (a time crop of ``audio_crop`` frames along the last axis, if set);
    visual: [T, 3, S, S]; flow: [T, 2, S, S]; rgb_diff: [T, 3, S, S].
    """

    def __init__(self, reader: CacheReader, rows: pd.DataFrame, labels: np.ndarray, modalities: Sequence[str],
                 train: bool, num_frames: int, sampling: Sampling, image_size: int, crop_scale: Sequence[float],
                 audio_crop: Optional[int] = None):
        self.reader = reader
        self.rows = rows.reset_index(drop=True)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.modalities = list(modalities)
        self.train, self.num_frames, self.sampling = train, num_frames, Sampling(sampling)
        self.audio_crop = audio_crop
        self.streams = reader.streams
        # UCF-101's streams are decoded together for one shared crop and flip
        self.joint = bool({"flow", "rgb_diff"} & set(self.modalities))
        if self.joint:
            self.transform = RGBFlowTransform(train, image_size, tuple(crop_scale))
        else:
            self.transform = FrameTransform(train, image_size, tuple(crop_scale))
        # plain arrays: a DataLoader worker reads them without touching pandas
        self._parts = self.rows["array_part"].to_numpy()
        self._array_rows = self.rows["array_row"].to_numpy()
        self._frame_start = self.rows["frame_start"].to_numpy()
        self._n_frames = self.rows["n_frames"].to_numpy()

    def streams_needed(self) -> set[str]:
        return {m for m in self.modalities if m in ("visual", "flow", "rgb_diff")}

    def __len__(self) -> int:
        return len(self.rows)

    def _audio(self, i: int) -> torch.Tensor:
        x = np.array(self.reader.array(int(self._parts[i]), int(self._array_rows[i])), dtype=np.float32)  # a copy
        if self.audio_crop is not None and x.shape[-1] > self.audio_crop:
            start = crop_start(x.shape[-1], self.audio_crop, self.train)
            x = x[..., start : start + self.audio_crop]
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0)

    def _jpegs(self, i: int, stream: str, times: list[int]) -> list[bytes]:
        s, n_streams = self.streams.index(stream), len(self.streams)
        start = int(self._frame_start[i])
        return [self.reader.jpeg(start + t * n_streams + s) for t in times]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        if "audio" in self.modalities:
            item["audio"] = self._audio(i)
        needed = self.streams_needed()
        if needed:
            times = frame_indices(int(self._n_frames[i]), self.num_frames, self.train, self.sampling)
            if self.joint:
                rgb = decode_frames(self._jpegs(i, "visual", times))
                flow = rgb_next = None
                if "flow" in needed:
                    flow = torch.cat([decode_frames(self._jpegs(i, f"flow_{c}", times), gray=True)
                                      for c in ("u", "v")], dim=1)
                if "rgb_diff" in needed:
                    rgb_next = decode_frames(self._jpegs(i, "visual_next", times))
                outputs = dict(zip(("visual", "flow", "rgb_diff"), self.transform(rgb, flow, rgb_next)))
                item.update({m: outputs[m] for m in needed})
            else:
                item["visual"] = self.transform(decode_frames(self._jpegs(i, "visual", times)))
        item["label"] = int(self.labels[i])
        item["index"] = i
        return item


class CachedDataset:
    """What the four real-dataset builders share: open the cache, refuse a mismatch, build the splits.

    Subclasses set ``name`` and ``all_modalities`` and call :meth:`_setup` from their (configurable) ``__init__``.
    """

    name: str = ""
    all_modalities: tuple[str, ...] = ("audio", "visual")

    def _setup(self, root: str, modalities: Sequence[str], audio_recipe_name: Optional[str], num_frames: int,
               image_size: int, crop_scale: Sequence[float], sampling: Sampling | str, frame_short_side: int,
               val_fraction: float, val_seed: int, audio_crop: Optional[int] = None,
               split_checks: Optional[dict[str, Any]] = None) -> None:
        unknown = set(modalities) - set(self.all_modalities)
        if unknown or not modalities:
            raise ValueError(f"{self.name} has modalities {list(self.all_modalities)}; got {list(modalities)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root)
        self.modalities = list(modalities)
        self.audio_recipe_name = audio_recipe_name
        self.num_frames, self.image_size, self.crop_scale = num_frames, image_size, tuple(crop_scale)
        self.sampling = Sampling(sampling)
        self.frame_short_side = frame_short_side
        self.val_fraction, self.val_seed = val_fraction, val_seed
        self.audio_crop = audio_crop
        self.split_checks = dict(split_checks or {})
        if audio_recipe_name is not None:
            audio_recipe(self.name, audio_recipe_name)  # an unknown recipe name fails here, before any file is read

    def _expected(self) -> tuple[dict[str, Any], dict[str, str]]:
        expected: dict[str, Any] = {"dataset": self.name, "frames.short_side": self.frame_short_side}
        fix = {"frames.short_side": f"ARGS=short_side={self.frame_short_side}"}
        if self.audio_recipe_name is not None and "audio" in self.all_modalities:
            expected["audio"] = audio_recipe(self.name, self.audio_recipe_name)
            fix["audio"] = f"AUDIO={self.audio_recipe_name}"
        for key, (value, arg) in self.split_checks.items():
            if value is not None:
                expected[key] = value
                fix[key] = arg
        return expected, fix

    def open(self) -> CacheReader:
        reader = CacheReader(self.root, self.name)
        reader.check(*self._expected())
        return reader

    def _split_rows(self, ok: pd.DataFrame, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Row positions of train / val / test; val carved from train (stratified) when the cache has none."""
        return split_positions(ok["split"].to_numpy(), self.name, self.root, "clip", self.val_fraction,
                               lambda train: stratified_holdout(train, labels[train], self.val_fraction, self.val_seed))

    def splits(self) -> DataSplits:
        reader = self.open()
        ok = reader.index[reader.index["status"] == OK].reset_index(drop=True)
        classes = reader.classes
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(ok["label"]) - set(lookup))
        if unknown:
            raise ValueError(f"index.csv of {reader.root} names labels not in recipe.json's classes: {unknown[:5]}")
        labels = ok["label"].map(lookup).to_numpy()
        parts = self._split_rows(ok, labels)
        log.info("%s cache %s: %s clips (train/val/test), splits from %s", self.name, reader.root,
                 "/".join(str(len(parts[s])) for s in ("train", "val", "test")), reader.recipe.get("splits"))

        def make(split: str, train: bool) -> CachedClips:
            idx = parts[split]
            return CachedClips(reader, ok.iloc[idx], labels[idx], self.modalities, train, self.num_frames,
                               self.sampling, self.image_size, self.crop_scale, self.audio_crop)

        return DataSplits(
            train=make("train", True), val=make("val", False), test=make("test", False),
            train_eval=make("train", False), num_classes=len(classes), modalities=list(self.modalities),
            class_names=classes,
        )


def split_positions(split: np.ndarray, name: str, root: Path, unit: str, val_fraction: float,
                    hold_out: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Positions of train / val / test in a cache's usable rows (``split``: each row's split name). Train and
    test must be non-empty; a cache without val gets ``hold_out(train positions) -> (train, val)`` when
    ``val_fraction`` > 0, else val = test (with a warning: choosing a checkpoint on val then chooses it on test)."""
    out = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    for s in ("train", "test"):
        if len(out[s]) == 0:
            raise ValueError(f"the {name} cache at {root} has no usable {unit} in split '{s}'; see the status and "
                             "reason columns of its index.csv")
    if len(out["val"]) == 0:
        if val_fraction > 0:
            out["train"], out["val"] = hold_out(out["train"])
        else:
            log.warning("%s has no val split and dataset.val_fraction=0: val is the TEST split, so choosing a "
                        "checkpoint on val chooses it on test", name)
            out["val"] = out["test"]
    return out


def stratified_holdout(positions: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    """Split ``positions`` into (kept, held out): about ``fraction`` of each class, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = positions[labels == c]
        k = int(round(fraction * len(members)))
        if k:
            held.extend(rng.permutation(members)[:k].tolist())
    if not held and len(positions) > 1:  # tiny sets: hold out one clip rather than nothing
        held = [int(rng.choice(positions))]
    held_set = set(held)
    kept = np.array([p for p in positions if p not in held_set], dtype=np.int64)
    return kept, np.array(sorted(held), dtype=np.int64)
