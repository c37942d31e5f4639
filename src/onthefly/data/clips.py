"""Datasets over a prepared clip cache (`cremad`, `kinetics_sounds`, `vggsound`, `ucf101`, and AVQA's media).

:class:`ClipCache` holds the options these datasets share and builds their splits; each split is a
:class:`CachedClips` dataset. Every sample is read from the cache with no video decoding: a memory-mapped spectrogram row (cropped at load
time where the recipe says so) and T JPEG frames chosen by :mod:`onthefly.data.sampling`, decoded and put
through the train or evaluation frame transform. UCF-101's RGB and optical flow share one crop and one flip
(the flip negates the horizontal flow u).
"""

import enum
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from onthefly.config import NonNegativeInt, PositiveInt, Range
from onthefly.data.audio import log_spectrogram
from onthefly.data.base import DataSplits, EmptySplitError
from onthefly.data.cache import AUDIO_PREP_DEFAULTS, FRAME_TIMES, CacheReader, audio_recipe, make_args, prep_command
from onthefly.data.loaders import mix_seed
from onthefly.data.sampling import Sampling, crop_start, frame_indices
from onthefly.data.transforms import IMAGENET_MEAN, IMAGENET_STD, FrameTransform, random_resized_crop_box

log = logging.getLogger("onthefly")

FIX_ONLY = object()  # see ClipCache.recipe_checks
FLOW_MEAN, FLOW_STD = 0.5, 0.226  # flow JPEGs: 128 = no motion; (x / 255 - 0.5) / 0.226, so a flip negates u exactly


def decode_frames(jpegs: Sequence[bytes], gray: bool = False) -> torch.Tensor:
    """JPEG bytes -> uint8 [T, C, H, W] (C = 3, or 1 with ``gray``), decoded by Pillow (libjpeg-turbo).

    (torchvision's JPEG codec is deprecated since 0.29; Pillow's is as fast and comes with torchvision anyway.)
    """
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("L" if gray else "RGB")) for b in jpegs]
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if gray else x.permute(0, 3, 1, 2)


class RGBFlowTransform:
    """UCF-101's streams under one crop box and one flip (docs/data.md): uint8 RGB [T, 3, H, W], optional flow
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


# --- the options that reproduce the released loaders (docs/method.md §9; conf/fidelity/ sets them) -----------
class FrameTimes(str, enum.Enum):
    centre = "centre"  # the frame at the centre of each second (docs/data.md)
    second_start = "second_start"  # the first frame of each second (the released extraction scripts)


class FrameCrops(str, enum.Enum):
    shared = "shared"  # one crop box and flip per clip
    per_frame = "per_frame"  # each frame its own (the CVPR VGGSound / Kinetics-Sounds loaders)


class EvalResize(str, enum.Enum):
    squash = "squash"  # Resize((S, S))
    crop = "crop"  # Resize(S) + CenterCrop(S) (the journal's Kinetics-Sounds loader)


class Downmix(str, enum.Enum):
    pyav = "pyav"  # FFmpeg's mono mix (each of two channels x 0.707)
    mean = "mean"  # the channel mean (librosa)
    first = "first"  # channel 0 (torchaudio's kaldi fbank)


class Resample(str, enum.Enum):
    sinc = "sinc"  # torchaudio's default
    kaiser_best = "kaiser_best"  # librosa's default before 0.10 (the CVPR CREMA-D loader)


class AudioEvalWindow(str, enum.Enum):
    centre = "centre"  # the centred window
    random = "random"  # a random window per clip (seeded: the same in every evaluation), as the CVPR VGGSound loader


def waveform_segment_spectrogram(wave: np.ndarray, recipe: dict, start: int) -> np.ndarray:
    """The ``waveform`` recipe at load time: ``recipe['window']`` samples from ``start``, clipped to [-1, 1], ->
    log(|STFT| + eps) of that segment alone (the CVPR VGGSound loader): float32 [n_fft / 2 + 1, frames]."""
    seg = torch.from_numpy(np.ascontiguousarray(wave[start : start + int(recipe["window"])], dtype=np.float32))
    spec = log_spectrogram(seg, int(recipe["n_fft"]), int(recipe["hop_length"]), float(recipe["eps"]))
    return spec.numpy()


class CachedClips(Dataset):
    """One split of a cache: items {modality: tensor, "label": int, "index": int}.

    audio: float32 [1, *shape] (a time crop of ``audio_crop`` frames along the last axis, if the dataset sets
    one); visual: [T, 3, S, S]; flow: [T, 2, S, S]; rgb_diff: [T, 3, S, S]. ``options`` (the dataset's
    :class:`ClipCache`) gives the modalities, T (``num_frames``), the frame ``sampling``, S (``image_size``)
    and the crop scale.
    """

    def __init__(self, reader: CacheReader, rows: pd.DataFrame, labels: np.ndarray, options: "ClipCache", train: bool):
        self.reader = reader
        self.rows = rows.reset_index(drop=True)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.modalities = list(options.modalities)
        self.train, self.num_frames, self.sampling = train, options.num_frames, Sampling(options.sampling)
        self.audio_crop = getattr(options, "audio_crop", None)  # only datasets with audio have this option
        self.audio_recipe = reader.recipe.get("audio") or {}
        # where the audio window is random: training, and evaluation under audio_eval_window=random
        self.random_window = train or getattr(options, "audio_eval_window", "centre") == AudioEvalWindow.random
        self.streams = reader.streams
        # UCF-101's streams are decoded together for one shared crop and flip
        self.joint = bool({"flow", "rgb_diff"} & set(self.modalities))
        scale = tuple(options.crop_scale)
        if self.joint:
            self.transform = RGBFlowTransform(train, options.image_size, scale)
        else:
            per_frame = getattr(options, "frame_crops", FrameCrops.shared) == FrameCrops.per_frame
            eval_resize = EvalResize(getattr(options, "eval_resize", EvalResize.squash)).value
            self.transform = FrameTransform(train, options.image_size, scale, per_frame, eval_resize)
        # plain arrays: a DataLoader worker reads them without touching pandas
        self._parts = self.rows["array_part"].to_numpy()
        self._array_rows = self.rows["array_row"].to_numpy()
        self._frame_start = self.rows["frame_start"].to_numpy()
        self._n_frames = self.rows["n_frames"].to_numpy()

    def streams_needed(self) -> set[str]:
        return {m for m in self.modalities if m in ("visual", "flow", "rgb_diff")}

    def __len__(self) -> int:
        return len(self.rows)

    def _window_start(self, i: int, total: int, size: int) -> int:
        """Where a window of ``size`` starts in ``total``: random in training (the item's seeded stream), the centre
        in evaluation, or under audio_eval_window=random a random start fixed per clip (its own generator, so the
        evaluation stays deterministic and the global stream untouched)."""
        if self.train or not self.random_window:
            return crop_start(total, size, self.train)
        generator = torch.Generator().manual_seed(mix_seed(0x5E6, i))
        return crop_start(total, size, True, generator)

    def _audio(self, i: int) -> torch.Tensor:
        x = np.array(self.reader.array(int(self._parts[i]), int(self._array_rows[i])), dtype=np.float32)  # a copy
        if self.audio_recipe.get("kind") == "waveform":  # the segment's spectrogram, computed here
            window = int(self.audio_recipe["window"])
            x = waveform_segment_spectrogram(x, self.audio_recipe, self._window_start(i, x.shape[-1], window))
        if self.audio_crop is not None and x.shape[-1] > self.audio_crop:
            start = self._window_start(i, x.shape[-1], self.audio_crop)
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
                    flow = torch.cat(
                        [decode_frames(self._jpegs(i, f"flow_{c}", times), gray=True) for c in ("u", "v")], dim=1
                    )
                if "rgb_diff" in needed:
                    rgb_next = decode_frames(self._jpegs(i, "visual_next", times))
                outputs = dict(zip(("visual", "flow", "rgb_diff"), self.transform(rgb, flow, rgb_next)))
                item.update({m: outputs[m] for m in needed})
            else:
                item["visual"] = self.transform(decode_frames(self._jpegs(i, "visual", times)))
        item["label"] = int(self.labels[i])
        item["index"] = i
        return item


@dataclass(eq=False)
class ClipCache:
    """The options every dataset over a clip cache shares, and what is done with them: open the cache (which
    checks its files, see :class:`CacheReader`), refuse one prepared differently from what the options ask,
    and build the train / val / test splits (:meth:`splits`, each a :class:`CachedClips`).

    A dataset is a dataclass subclass decorated with ``@configurable("dataset")``: it sets ``name`` and
    ``all_modalities``, its own defaults and its own options, and its fields are its typed Hydra schema, one flat
    key each under ``dataset.`` (``conf/dataset/<name>.yaml`` lists every one of them with a comment).
    """

    name: ClassVar[str] = ""
    all_modalities: ClassVar[tuple[str, ...]] = ("audio", "visual")

    root: str
    # list options take tuple defaults (a dataclass default must be immutable); __post_init__ makes them lists
    modalities: List[str] = ("audio", "visual")
    num_frames: PositiveInt = 3
    image_size: PositiveInt = 224
    crop_scale: List[float] = (0.08, 1.0)
    sampling: Sampling = Sampling.segments
    frame_short_side: NonNegativeInt = 256
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.1
    val_seed: NonNegativeInt = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.modalities = list(self.modalities)
        self.crop_scale = [float(x) for x in self.crop_scale]
        self.sampling = Sampling(self.sampling)
        unknown = set(self.modalities) - set(self.all_modalities)
        if unknown or not self.modalities:
            raise ValueError(f"{self.name} has modalities {list(self.all_modalities)}; got {self.modalities}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction must be in [0, 1), got {self.val_fraction}")

    def recipe_checks(self) -> dict[str, tuple[Any, str]]:
        """What the cache's recipe.json must hold for these options: {dotted key: (value, the prep argument
        that makes such a cache)}; a value of ``FIX_ONLY`` only names the prep argument for a key compared as part
        of another (a field of the ``audio`` recipe). Subclasses add theirs."""
        return {
            "dataset": (self.name, ""),
            "frames.short_side": (self.frame_short_side, f"ARGS=short_side={self.frame_short_side}"),
        }

    def usable_rows(self, ok: pd.DataFrame) -> pd.DataFrame:
        """The cache's usable rows this dataset reads (a subclass may leave some out)."""
        return ok

    def prep_args(self) -> list[str]:
        """The prep arguments (make variables) a cache for these options needs beyond the defaults, for the
        command a missing cache's message names."""
        return [] if self.frame_short_side == 256 else [f"ARGS=short_side={self.frame_short_side}"]

    def open(self) -> CacheReader:
        reader = CacheReader(self.root, self.name, prep_command(self.name, self.root, make_args(self.prep_args())))
        checks = self.recipe_checks()
        reader.check(
            {key: value for key, (value, _) in checks.items() if value is not FIX_ONLY},
            {key: arg for key, (_, arg) in checks.items() if arg},
        )
        return reader

    def splits(self) -> DataSplits:
        reader = self.open()
        ok = self.usable_rows(reader.ok_rows()).reset_index(drop=True)
        classes = reader.classes
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(ok["label"]) - set(lookup))
        if unknown:
            raise ValueError(f"index.csv of {reader.root} names labels not in recipe.json's classes: {unknown[:5]}")
        labels = ok["label"].map(lookup).to_numpy()
        parts = split_positions(
            ok["split"].to_numpy(),
            self.root,
            "clip",
            self.val_fraction,
            lambda train, fraction: stratified_holdout(train, labels[train], fraction, self.val_seed),
        )
        log.info(
            "%s cache %s: %s clips (train/val/test), splits from %s",
            self.name,
            reader.root,
            "/".join(str(len(parts[s])) for s in ("train", "val", "test")),
            reader.recipe.get("splits"),
        )

        def make(split: str, train: bool) -> CachedClips:
            idx = parts[split]
            return CachedClips(reader, ok.iloc[idx], labels[idx], self, train)

        return DataSplits(
            train=make("train", True),
            val=make("val", False),
            test=make("test", False),
            train_eval=make("train", False),
            num_classes=len(classes),
            modalities=list(self.modalities),
            class_names=classes,
        )


@dataclass(eq=False)
class AudioClipCache(ClipCache):
    """A clip cache with a spectrogram per clip, computed by the prep with the named ``audio_recipe`` (the
    cache must hold that one); each sample takes ``audio_crop`` frames of its time axis (null: all of them).

    The options that reproduce the released loaders (docs/method.md §9), each on its own (their defaults are the
    clean protocol): ``frame_times`` and ``downmix`` say how the cache was prepared (checked against its recipe);
    ``frame_crops``, ``eval_resize``, ``audio_eval_window`` and ``min_frames`` act at load time.
    """

    audio_recipe: str = ""
    audio_crop: Annotated[Optional[int], Range(ge=1)] = None
    frame_times: FrameTimes = FrameTimes.centre
    downmix: Downmix = Downmix.pyav
    frame_crops: FrameCrops = FrameCrops.shared
    eval_resize: EvalResize = EvalResize.squash
    audio_eval_window: AudioEvalWindow = AudioEvalWindow.centre
    min_frames: NonNegativeInt = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.frame_times, self.downmix = FrameTimes(self.frame_times), Downmix(self.downmix)
        self.frame_crops, self.eval_resize = FrameCrops(self.frame_crops), EvalResize(self.eval_resize)
        self.audio_eval_window = AudioEvalWindow(self.audio_eval_window)
        audio_recipe(self.name, self.audio_recipe)  # an unknown recipe name fails here, before any file is read
        if self.audio_crop is not None and self.audio_crop < 1:
            raise ValueError(
                f"dataset.audio_crop must be at least 1 (or null: the whole spectrogram), got {self.audio_crop}"
            )

    def recipe_checks(self) -> dict[str, tuple[Any, str]]:
        checks = {
            **super().recipe_checks(),
            "audio": (audio_recipe(self.name, self.audio_recipe, **self.audio_prep()), f"AUDIO={self.audio_recipe}"),
            "frames.times": (FRAME_TIMES[self.frame_times.value], f"ARGS=frame_times={self.frame_times.value}"),
        }
        for option, value in self.audio_prep().items():  # compared within "audio"; named for the fix
            checks[f"audio.{option}"] = (FIX_ONLY, f"ARGS={option}={value}")
        return checks

    def prep_args(self) -> list[str]:
        args = super().prep_args()
        if self.audio_recipe != type(self).audio_recipe:  # the dataset's default recipe
            args.append(f"AUDIO={self.audio_recipe}")
        if self.frame_times is not FrameTimes.centre:
            args.append(f"ARGS=frame_times={self.frame_times.value}")
        args += [f"ARGS={k}={v}" for k, v in self.audio_prep().items() if v != AUDIO_PREP_DEFAULTS[k]]
        return args

    def audio_prep(self) -> dict[str, str]:
        """The prep's audio options these options ask for (``audio_recipe``'s keyword arguments)."""
        return {"downmix": self.downmix.value}

    def usable_rows(self, ok: pd.DataFrame) -> pd.DataFrame:
        if self.min_frames > 1 and "visual" in self.modalities:
            short = ok["n_frames"] < self.min_frames
            if short.any():
                log.info(
                    "%s: %d clips with fewer than %d frames left out (dataset.min_frames)",
                    self.name,
                    int(short.sum()),
                    self.min_frames,
                )
            ok = ok[~short]
        return ok


def split_positions(
    split: np.ndarray,
    root: Path,
    unit: str,
    val_fraction: float,
    hold_out: Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Positions of train / val / test in a cache's usable rows (``split``: each row's split name). A cache
    without val gets ``hold_out(train positions, val_fraction) -> (train, val)`` when ``val_fraction`` > 0,
    else val = test (with a warning: choosing a checkpoint on val then chooses it on test). A split that ends
    up empty is an :class:`EmptySplitError` naming the cache or the setting that emptied it."""
    out = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    for s in ("train", "test"):
        if len(out[s]) == 0:
            raise EmptySplitError(
                f"the {s} split is empty: the cache at {root} has no usable {unit} in split "
                f"'{s}'; see the status and reason columns of its index.csv"
            )
    if len(out["val"]) == 0:
        if val_fraction > 0:
            train = out["train"]
            out["train"], out["val"] = hold_out(train, val_fraction)
            if len(out["train"]) == 0:
                usable = [
                    f
                    for f in (0.5, 0.25, 0.1, 0.05)
                    if f < val_fraction and all(len(part) for part in hold_out(train, f))
                ]
                advice = (
                    f"use a value of {usable[0]} or less"
                    if usable
                    else "it holds too few to hold any out: use dataset.val_fraction=0 (val = test)"
                )
                raise EmptySplitError(
                    f"the train split is empty: dataset.val_fraction={val_fraction} moved all "
                    f"{len(train)} training {unit}s of {root} into val; {advice}"
                )
            if len(out["val"]) == 0:
                raise EmptySplitError(
                    f"the val split is empty: dataset.val_fraction={val_fraction} held out none "
                    f"of the {len(train)} training {unit}s of {root}; use a larger value, or 0 "
                    "to use the test split as val"
                )
        else:
            log.warning(
                "%s has no val split and dataset.val_fraction=0: val is the TEST split, so choosing a "
                "checkpoint on val chooses it on test",
                root,
            )
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
