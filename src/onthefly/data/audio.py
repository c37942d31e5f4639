"""Audio features shared by the synthetic benchmark and the real datasets' prep code (docs/data.md recipes)."""

from __future__ import annotations

import torch


def tile_to_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a 1-D (or batched [..., T]) waveform until it has ``length`` samples, then cut.

    An empty waveform stays empty-shaped as zeros (tiling nothing gives nothing), so callers can record it as bad.
    """
    n = wave.shape[-1]
    if n == 0:
        return wave.new_zeros(*wave.shape[:-1], length)
    reps = -(-length // n)
    return wave.repeat(*([1] * (wave.dim() - 1)), reps)[..., :length]


def log_spectrogram(wave: torch.Tensor, n_fft: int, hop_length: int, eps: float = 1e-7) -> torch.Tensor:
    """log(|STFT| + eps) with a Hann window, centred frames: [..., T] -> [..., n_fft // 2 + 1, frames].

    The OGM-GE recipe (CREMA-D: n_fft 512, hop 353; VGGSound: n_fft 256, hop 128) after clipping to [-1, 1].
    """
    wave = wave.clamp(-1.0, 1.0)
    window = torch.hann_window(n_fft, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(wave, n_fft=n_fft, hop_length=hop_length, window=window, center=True, return_complex=True)
    return torch.log(spec.abs() + eps)
