"""The built-in synthetic audio-visual benchmark (`dataset=synth_av`, and `synth_av3` with a third modality).

Every clip has a class label and, per modality, a signal that names a class:

* audio: a raw waveform holding a class-specific tone (plus its octave) in noise. It goes through
  :func:`onthefly.data.audio.log_spectrogram`, exactly as real audio does. Easy to learn: the dominant modality.
* visual: a stack of small uint8 frames showing a class-specific texture (a mix of gratings) at a random
  position, moving between frames, buried in pixel noise. It goes through the same frame transforms as real
  frames. Informative but slow to learn: the modality that joint training leaves under-optimised.
* sensor (only in ``modalities``' third slot, ``synth_av3``): a noisy class-mean vector, for 3-modality runs.

Knobs per modality: ``*_informative`` is the probability that the signal names the true class (otherwise a
uniformly drawn wrong class: an accuracy ceiling for that modality alone), and the signal-to-noise knobs set
how hard the signal is to learn. The corruptions are independent across modalities, so the modalities are
complementary. Everything is generated in memory from ``seed``; each split has its own stream, so changing
one split's size leaves the others unchanged.
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch.utils.data import Dataset

from onthefly.config import configurable
from onthefly.data.audio import log_spectrogram
from onthefly.data.base import DataSplits, EmptySplitError
from onthefly.data.transforms import frame_transform

_SPLITS = ("train", "val", "test")
_MEMO: dict = {}


def _signal_classes(labels: torch.Tensor, informative: float, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """The class each sample's signal shows: the label with probability `informative`, else a wrong class."""
    wrong = (labels + torch.randint(1, num_classes, labels.shape, generator=g)) % num_classes
    keep = torch.rand(labels.shape, generator=g) < informative
    return torch.where(keep, labels, wrong)


class SynthSplit(Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor], labels: torch.Tensor, frame_tf=None):
        # tensors: {modality: [N, ...]}; training frames stay uint8 until frame_tf (crop/flip/normalise) runs per
        # clip; evaluation frames arrive already transformed (frame_tf None)
        self.tensors, self.labels, self.frame_tf = tensors, labels, frame_tf

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {m: x[i] for m, x in self.tensors.items()}
        if "visual" in item and self.frame_tf is not None:
            item["visual"] = self.frame_tf(item["visual"])
        item["label"] = int(self.labels[i])
        item["index"] = i
        return item


@configurable("dataset")
class SynthAV:
    """Builds the train / val / test splits of the synthetic benchmark (see the module docstring)."""

    def __init__(
        self,
        modalities: List[str] = ["audio", "visual"],  # noqa: B006 (copied by the schema)
        num_classes: int = 8,
        num_train: int = 1200,
        num_val: int = 400,
        num_test: int = 800,
        seed: int = 1234,
        # audio
        sample_rate: int = 8000,
        duration: float = 0.5,
        n_fft: int = 128,
        hop_length: int = 250,
        audio_informative: float = 0.7,
        audio_noise: float = 1.0,
        # visual
        num_frames: int = 2,
        frame_size: int = 40,
        crop_size: int = 32,
        crop_scale: List[float] = [0.5, 1.0],  # noqa: B006
        visual_informative: float = 0.95,
        visual_signal: float = 0.4,
        visual_noise: float = 1.0,
        # sensor (third modality)
        sensor_dim: int = 32,
        sensor_informative: float = 0.6,
        sensor_noise: float = 2.0,
    ):
        unknown = set(modalities) - {"audio", "visual", "sensor"}
        if unknown:
            raise ValueError(f"synth_av has modalities audio, visual, sensor; got unknown {sorted(unknown)}")
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}

        self.seed = seed
        self.sample_rate, self.duration, self.n_fft, self.hop_length = sample_rate, duration, n_fft, hop_length
        self.audio_informative, self.audio_noise = audio_informative, audio_noise
        self.num_frames, self.frame_size, self.crop_size = num_frames, frame_size, crop_size
        self.crop_scale = tuple(crop_scale)
        self.visual_informative, self.visual_signal, self.visual_noise = visual_informative, visual_signal, visual_noise
        self.sensor_dim, self.sensor_informative, self.sensor_noise = sensor_dim, sensor_informative, sensor_noise

    # --- class prototypes (shared by all splits) ---------------------------------------------------------
    def _prototypes(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        c, s = self.num_classes, self.frame_size
        # audio: log-spaced tone frequencies well inside the Nyquist band
        freqs = torch.logspace(math.log10(250.0), math.log10(0.35 * self.sample_rate), c)
        # visual: each class a sum of three coloured gratings with its own orientations and frequencies
        yy, xx = torch.meshgrid(
            torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij"
        )
        theta = torch.rand(c, 3, generator=g) * math.pi
        cycles = 2.0 + 3.0 * torch.rand(c, 3, generator=g)
        phase = 2 * math.pi * torch.rand(c, 3, generator=g)
        colour = torch.randn(c, 3, 3, generator=g)  # [class, grating, rgb]
        arg = (torch.cos(theta)[..., None, None] * xx + torch.sin(theta)[..., None, None] * yy) * (
            2 * math.pi * cycles[..., None, None] / s
        ) + phase[..., None, None]
        gratings = torch.sin(arg)  # [c, 3, s, s]
        textures = torch.einsum("ckhw,ckr->crhw", gratings, colour)
        textures = textures / textures.flatten(1).std(dim=1)[:, None, None, None]
        sensor = torch.randn(c, self.sensor_dim, generator=g)
        return {"freqs": freqs, "textures": textures, "sensor": sensor}

    # --- per-split generation ------------------------------------------------------------------------------
    def _audio(self, cls: torch.Tensor, protos, g: torch.Generator) -> torch.Tensor:
        n, length = len(cls), int(self.sample_rate * self.duration)
        t = torch.arange(length, dtype=torch.float32) / self.sample_rate
        f = protos["freqs"][cls] * (1 + 0.02 * torch.randn(n, generator=g))
        phase = 2 * math.pi * torch.rand(n, 2, generator=g)
        tone = torch.sin(2 * math.pi * f[:, None] * t + phase[:, :1]) + 0.5 * torch.sin(
            4 * math.pi * f[:, None] * t + phase[:, 1:]
        )
        amplitude = 0.2 + 0.3 * torch.rand(n, 1, generator=g)
        wave = amplitude * (tone + self.audio_noise * torch.randn(n, length, generator=g)) / (1 + self.audio_noise)
        return log_spectrogram(wave, self.n_fft, self.hop_length).unsqueeze(1)  # [n, 1, freq, time]

    def _visual(self, cls: torch.Tensor, protos, g: torch.Generator) -> torch.Tensor:
        n, s, t = len(cls), self.frame_size, self.num_frames
        tex = protos["textures"][cls]  # [n, 3, s, s]
        start = torch.randint(0, s, (n, 2), generator=g)
        velocity = torch.randint(-3, 4, (n, 2), generator=g)
        frames = torch.empty(n, t, 3, s, s)
        idx = torch.arange(s)
        for k in range(t):  # small loop over frames, vectorised over clips
            dy, dx = (start + k * velocity).unbind(1)
            rows = (idx[None, :] + dy[:, None]) % s  # [n, s]
            cols = (idx[None, :] + dx[:, None]) % s
            shifted = tex.gather(2, rows[:, None, :, None].expand(n, 3, s, s))
            frames[:, k] = shifted.gather(3, cols[:, None, None, :].expand(n, 3, s, s))
        brightness = 0.1 * torch.randn(n, 1, 1, 1, 1, generator=g)
        noise = torch.randn(n, t, 3, s, s, generator=g)
        pixels = 0.5 + brightness + 0.15 * (self.visual_signal * frames + self.visual_noise * noise)
        return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)  # [n, T, 3, s, s]

    def _sensor(self, cls: torch.Tensor, protos, g: torch.Generator) -> torch.Tensor:
        return protos["sensor"][cls] + self.sensor_noise * torch.randn(len(cls), self.sensor_dim, generator=g)

    def _split(self, split: str, protos, train_transform: bool) -> SynthSplit:
        g = torch.Generator().manual_seed(self.seed * 1000 + 1 + _SPLITS.index(split))
        n = self.sizes[split]
        labels = torch.arange(n) % self.num_classes  # balanced classes
        labels = labels[torch.randperm(n, generator=g)]
        informative = {
            "audio": self.audio_informative,
            "visual": self.visual_informative,
            "sensor": self.sensor_informative,
        }
        make = {"audio": self._audio, "visual": self._visual, "sensor": self._sensor}
        tensors = {}
        for m in ("audio", "visual", "sensor"):  # fixed order: the streams do not depend on `modalities`
            cls = _signal_classes(labels, informative[m], self.num_classes, g)
            data = make[m](cls, protos, g)
            if m in self.modalities:
                tensors[m] = data
        tf = frame_transform(train_transform, self.crop_size, self.crop_scale)
        if not train_transform and "visual" in tensors:  # deterministic: transform once, not every epoch
            tensors["visual"], tf = tf.precompute(tensors["visual"]), None
        return SynthSplit(tensors, labels, tf)

    def splits(self) -> DataSplits:
        """The three splits (memoised per process: a sweep or the demo regenerates nothing it already has)."""
        for split, n in self.sizes.items():
            if n < 1:
                raise EmptySplitError(
                    f"the {split} split is empty: dataset.num_{split}={n}; use at least 1 (a few "
                    f"per class: dataset.num_classes={self.num_classes})"
                )
        key = repr(sorted(vars(self).items()))
        if key not in _MEMO:
            _MEMO.clear()  # keep one dataset in memory
            _MEMO[key] = self._build()
        return _MEMO[key]

    def _build(self) -> DataSplits:
        protos = self._prototypes()
        built = {s: self._split(s, protos, s == "train") for s in _SPLITS}
        return DataSplits(
            **built,
            train_eval=self._split("train", protos, False),
            num_classes=self.num_classes,
            modalities=self.modalities,
            class_names=[f"class_{i}" for i in range(self.num_classes)],
        )
