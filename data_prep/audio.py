"""The audio recipes of docs/data.md, computed from their parameters in ``onthefly.data.cache.AUDIO_RECIPES``.

The parameters live with the cache format (so a reader can refuse a cache made differently); this module only
turns a waveform into the recipe's array.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi

from onthefly.data.audio import log_spectrogram, tile_to_length


def compute(wave: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
    """Mono float waveform at ``recipe['sample_rate']`` -> the recipe's array (``recipe['shape']``, its dtype)."""
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if x.numel() == 0:
        raise ValueError("empty waveform: the prep must refuse it before computing a recipe")
    if recipe.get("tile"):
        x = tile_to_length(x, int(recipe["tile"]))
    if recipe.get("clip"):
        x = x.clamp(-1.0, 1.0)
    if recipe.get("subtract_mean"):
        x = x - x.mean()
    kind = recipe["kind"]
    if kind == "waveform":  # kept as a waveform; the reader transforms a segment of it (onthefly.data.clips)
        feats = x
    elif kind == "stft":
        feats = log_spectrogram(x, int(recipe["n_fft"]), int(recipe["hop_length"]), float(recipe["eps"]))
    elif kind == "fbank":
        feats = kaldi.fbank(
            x.unsqueeze(0),
            sample_frequency=float(recipe["sample_rate"]),
            num_mel_bins=int(recipe["num_mel_bins"]),
            frame_length=float(recipe["frame_length_ms"]),
            frame_shift=float(recipe["frame_shift_ms"]),
            window_type="hanning",
            dither=0.0,
            use_energy=False,
            htk_compat=True,
        )
        frames = int(recipe["frames"])
        if feats.shape[0] < frames:
            feats = torch.nn.functional.pad(feats, (0, 0, 0, frames - feats.shape[0]))
        feats = feats[:frames]
    else:
        raise ValueError(f"unknown audio recipe kind {kind!r}")
    if "norm_mean" in recipe:
        feats = (feats - float(recipe["norm_mean"])) / float(recipe["norm_std"])
    if list(feats.shape) != list(recipe["shape"]):
        raise AssertionError(f"recipe {recipe.get('name')} made {list(feats.shape)}, expected {recipe['shape']}")
    return feats.numpy().astype(recipe["dtype"])
