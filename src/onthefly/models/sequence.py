"""Encoders for sequences: per-modality feature sequences (CMU-MOSI's text / audio / visual features) and token
sequences (AVQA's questions and answer choices).

A sequence input is a dict ``{"x": [B, T, D], "length": [B]}`` (a plain ``[B, T, D]`` tensor counts as all steps
valid); steps at or past ``length`` are padding and never reach the pooled feature. The input size ``in_dim``
is read from the data when the model is built (``DataSplits.encoder_args``), never written in a config.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from onthefly.config import DropoutRate, PositiveInt, configurable
from onthefly.models.encoders import init_weights


def _unpack(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(inputs, dict):
        x = inputs["x"]
        length = inputs.get("length")
    else:
        x, length = inputs, None
    if length is None:
        length = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    return x, length.to(x.device).long().clamp(1, x.shape[1])


def sinusoid(length: int, width: int, device, dtype) -> torch.Tensor:
    """Fixed sine/cosine position codes [length, width] (any length, no table to outgrow)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    out = torch.zeros(length, width, device=device)
    out[:, 0::2] = torch.sin(pos * rate)
    out[:, 1::2] = torch.cos(pos * rate[: width // 2])
    return out.to(dtype)


@configurable("encoder", runtime=("in_dim",))
class TransformerSequenceEncoder(nn.Module):
    """Linear projection to ``width`` + sine positions + a pre-norm transformer encoder; the valid steps are
    averaged into one ``width`` vector."""

    def __init__(
        self,
        in_dim: int,
        width: PositiveInt = 64,
        layers: PositiveInt = 2,
        heads: PositiveInt = 4,
        ff_mult: PositiveInt = 2,
        dropout: DropoutRate = 0.1,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"transformer width {width} must be divisible by heads {heads}")
        self.proj = nn.Linear(in_dim, width)
        layer = nn.TransformerEncoderLayer(width, heads, ff_mult * width, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out_dim = width
        init_weights(self.proj)

    def forward(self, inputs) -> torch.Tensor:
        x, length = _unpack(inputs)
        b, t, _ = x.shape
        h = self.proj(x) + sinusoid(t, self.out_dim, x.device, x.dtype)
        pad = torch.arange(t, device=x.device)[None, :] >= length[:, None]  # [B, T] True = padding
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = (~pad).to(h.dtype)[..., None]
        return (h * keep).sum(1) / keep.sum(1)


@configurable("encoder", runtime=("in_dim",))
class LSTMSequenceEncoder(nn.Module):
    """An LSTM over the valid steps (packed, so padding is never read); the last layer's final hidden states
    (both directions when bidirectional) form one ``width`` vector."""

    def __init__(
        self,
        in_dim: int,
        width: PositiveInt = 64,
        layers: PositiveInt = 1,
        bidirectional: bool = True,
        dropout: DropoutRate = 0.0,
    ):
        super().__init__()
        if bidirectional and width % 2:
            raise ValueError(f"a bidirectional LSTM needs an even width, got {width}")
        self.directions = 2 if bidirectional else 1
        self.lstm = nn.LSTM(
            in_dim,
            width // self.directions,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.out_dim = width

    def forward(self, inputs) -> torch.Tensor:
        x, length = _unpack(inputs)
        packed = pack_padded_sequence(x, length.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return h[-self.directions :].transpose(0, 1).reshape(x.shape[0], -1)


class TextEncoderKind(str, enum.Enum):
    lstm = "lstm"
    transformer = "transformer"


@configurable("encoder", runtime=("vocab_size",))
class QuestionEncoder(nn.Module):
    """Word embeddings (trained from scratch; id 0 is padding) + an LSTM or a small transformer.

    Input: {"tokens": [B, L], "length": [B]} and, for multiple choice, {"choices": [B, C, Lc],
    "choice_lengths": [B, C]}. Output [B, 1 + C, width]: the question's vector, then each choice's (encoded
    by the same network).
    """

    def __init__(
        self,
        vocab_size: int,
        width: PositiveInt = 128,
        embed_dim: PositiveInt = 128,
        kind: TextEncoderKind = TextEncoderKind.lstm,
        layers: PositiveInt = 1,
        heads: PositiveInt = 4,
        dropout: DropoutRate = 0.1,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        nn.init.normal_(self.embed.weight, std=embed_dim**-0.5)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        if TextEncoderKind(kind) is TextEncoderKind.lstm:
            self.seq: nn.Module = LSTMSequenceEncoder(embed_dim, width, layers, bidirectional=True)
        else:
            self.seq = TransformerSequenceEncoder(embed_dim, width, layers, heads, dropout=dropout)
        self.out_dim = width

    def _encode(self, tokens: torch.Tensor, length: Optional[torch.Tensor]) -> torch.Tensor:
        if length is None:
            length = (tokens != 0).sum(-1)
        return self.seq({"x": self.embed(tokens), "length": length})

    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        question = self._encode(inputs["tokens"], inputs.get("length"))[:, None]
        if "choices" not in inputs:
            return question
        choices = inputs["choices"]
        b, c, length = choices.shape
        lengths = inputs.get("choice_lengths")
        encoded = self._encode(choices.reshape(b * c, length), lengths.reshape(-1) if lengths is not None else None)
        return torch.cat([question, encoded.view(b, c, -1)], dim=1)
