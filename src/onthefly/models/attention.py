"""Attention fusion over ResNet18 tokens ("VATT-like"; docs/method.md §10.3). No released code shows the journal's
transformer fusion, so both designs here are assumptions.

* ``TokenEmbedding`` (interaction): each modality's last-stage map becomes tokens, one per grid cell and frame:
  t = LN(W_m f + b_m) + e_type[m] + e_pos(row, col) + e_frame[t] (fixed 2-D sine-cosine positions, learned type
  and frame-index embeddings). Feature of modality m: its tokens [B, T·H·W, d].
* ``CrossAttentionFusion`` (head, ``fusion=xattn``): one pre-LN transformer over [CLS; audio tokens; visual
  tokens], logits = Linear(LN(CLS)). A modality whose tokens are all exactly zero for a sample (OPM's drop,
  zero-out, a missing-modality test) is absent: its tokens are key-padding masked, so zeroing means masking here.
* ``SharedTokenTransformer`` (interaction, ``fusion=vatt_ma``): one transformer shared by the modalities, applied
  to each modality's tokens separately with its own CLS; feature of m: LN(CLS_m). A concat head fuses them. The
  modalities share parameters, so OGM scales feature gradients there (docs/method.md §10.4).
"""

from __future__ import annotations

import enum
from typing import Dict, Mapping

import torch
from torch import nn

from onthefly.config import ConfigError, DropoutRate, PositiveInt, configurable
from onthefly.models.encoders import init_weights
from onthefly.models.fusion import FusionHead
from onthefly.models.interaction import Interaction
from onthefly.models.sequence import sinusoid


def grid_positions(rows: int, cols: int, width: int, device, dtype) -> torch.Tensor:
    """Fixed 2-D sine-cosine codes [rows·cols, width]: half the channels code the row, half the column."""
    half = width // 2
    r = sinusoid(rows, half, device, dtype)[:, None, :].expand(rows, cols, half)
    c = sinusoid(cols, width - half, device, dtype)[None, :, :].expand(rows, cols, width - half)
    return torch.cat([r, c], dim=-1).reshape(rows * cols, width)


def encoder_layers(dim: int, layers: int, heads: int, ff_mult: int, dropout: float) -> nn.TransformerEncoder:
    if dim % heads:
        raise ConfigError(f"attention width {dim} must be divisible by heads {heads}")
    layer = nn.TransformerEncoderLayer(
        dim, heads, ff_mult * dim, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@configurable("interaction", runtime=("encoders",))
class TokenEmbedding(Interaction):
    """The encoders' last-stage maps as embedded tokens (see the module docstring)."""

    fusion_name = "xattn"

    def __init__(self, encoders: Mapping[str, nn.Module], dim: PositiveInt = 256, max_frames: PositiveInt = 32):
        super().__init__(encoders)
        self.dim, self.max_frames = int(dim), int(max_frames)
        self.proj = nn.ModuleDict({m: nn.Linear(enc.stage_channels[-1], dim) for m, enc in encoders.items()})
        self.norm = nn.ModuleDict({m: nn.LayerNorm(dim) for m in encoders})
        self.type_embedding = nn.ParameterDict({m: nn.Parameter(torch.zeros(dim)) for m in encoders})
        self.frame_embedding = nn.Parameter(torch.zeros(max_frames, dim))  # shared; a spectrogram is frame 0
        init_weights(self)
        for p in [*self.type_embedding.values(), self.frame_embedding]:
            nn.init.normal_(p, std=0.02)
        self.feature_dims = {m: dim for m in encoders}

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """W_m, its LayerNorm and e_type[m] (the frame embedding is shared)."""
        return [*self.proj[modality].parameters(), *self.norm[modality].parameters(), self.type_embedding[modality]]

    def tokens(self, encoders, inputs) -> Dict[str, torch.Tensor]:
        hs, frames = self.stems(encoders, inputs)
        out = {}
        for m, h in hs.items():
            for level in range(1, 5):
                h = encoders[m].stage(level, h)
            bt, c, rows, cols = h.shape
            t = frames[m]
            if t > self.max_frames:
                raise ValueError(f"fusion.interaction.max_frames={self.max_frames}, but the {m} input has {t} frames")
            x = self.norm[m](self.proj[m](h.flatten(2).transpose(1, 2)))  # [B·T, H·W, d]
            x = x + self.type_embedding[m] + grid_positions(rows, cols, self.dim, x.device, x.dtype)
            x = x.view(bt // t, t, rows * cols, self.dim) + self.frame_embedding[:t, None, :]
            out[m] = x.flatten(1, 2)  # [B, T·H·W, d]
        return out

    def forward(self, encoders, inputs, ctx=None):
        return self.tokens(encoders, inputs)


class Absent(str, enum.Enum):
    mask = "mask"  # a modality whose tokens are all zero for a sample is key-padding masked
    zeros = "zeros"  # zeroed tokens stay in the sequence as zero vectors (they still take attention weight)


@configurable("fusion", runtime=("feature_dims", "num_classes"))
class CrossAttentionFusion(FusionHead):
    """A joint transformer over [CLS; tokens of every modality] (``fusion=xattn``; see the module docstring).
    Uni-modal logits: the transformer on [CLS; m's tokens] alone, which equals masking the other modalities."""

    natural_estimator = "masked"

    def __init__(
        self,
        feature_dims: Dict[str, int],
        num_classes: int,
        layers: PositiveInt = 2,
        heads: PositiveInt = 4,
        ff_mult: PositiveInt = 4,
        dropout: DropoutRate = 0.1,
        absent: Absent = Absent.mask,
    ):
        super().__init__(feature_dims, num_classes)
        dims = set(feature_dims.values())
        if len(dims) != 1:
            raise ConfigError(f"fusion=xattn needs tokens of one width for every modality, got {feature_dims}")
        dim = dims.pop()
        self.absent = Absent(absent)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = encoder_layers(dim, layers, heads, ff_mult, dropout)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, num_classes)
        init_weights(self.out)
        nn.init.normal_(self.cls, std=0.02)

    def attend(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Logits from the CLS output over [CLS; *tokens]; absent modalities masked (``absent=mask``)."""
        b = tokens[0].shape[0]
        seq = torch.cat([self.cls.expand(b, -1, -1).to(tokens[0].dtype), *tokens], dim=1)
        pad = None
        if self.absent is Absent.mask:
            parts = [torch.zeros(b, 1, dtype=torch.bool, device=seq.device)]
            for x in tokens:
                gone = (x == 0).flatten(1).all(dim=1)  # [B]
                parts.append(gone[:, None].expand(b, x.shape[1]))
            pad = torch.cat(parts, dim=1)
        h = self.encoder(seq, src_key_padding_mask=pad)
        return self.out(self.norm(h[:, 0]))

    def forward(self, feats):
        return self.attend([feats[m] for m in self.modalities])

    def natural_unimodal(self, feats):
        return {m: self.attend([feats[m]]) for m in self.modalities}


@configurable("interaction", runtime=("encoders",))
class SharedTokenTransformer(TokenEmbedding):
    """One transformer shared by the modalities, each modality's tokens encoded separately with its own CLS
    (``fusion=vatt_ma``; see the module docstring)."""

    fusion_name = "vatt_ma"
    shares_parameters = True

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        dim: PositiveInt = 256,
        max_frames: PositiveInt = 32,
        layers: PositiveInt = 2,
        heads: PositiveInt = 4,
        ff_mult: PositiveInt = 4,
        dropout: DropoutRate = 0.1,
    ):
        super().__init__(encoders, dim, max_frames)
        self.cls = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, dim)) for m in encoders})
        for p in self.cls.values():
            nn.init.normal_(p, std=0.02)
        self.encoder = encoder_layers(dim, layers, heads, ff_mult, dropout)
        self.out_norm = nn.LayerNorm(dim)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return [*super().modality_parameters(modality), self.cls[modality]]

    def forward(self, encoders, inputs, ctx=None):
        out = {}
        for m, x in self.tokens(encoders, inputs).items():
            seq = torch.cat([self.cls[m].expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            out[m] = self.out_norm(self.encoder(seq)[:, 0])
        return out
