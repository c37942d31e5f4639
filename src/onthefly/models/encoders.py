"""Per-modality encoders. Each exposes ``out_dim`` (its feature width)."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from onthefly.config import Choice, PositiveInt, configurable


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def init_weights(module: nn.Module) -> None:
    """CVPR 2022 protocol: Kaiming-normal (fan_out) convs, Xavier-normal linears, BN weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@configurable("encoder")
class ResNet18(nn.Module):
    """ResNet18 trained from scratch (the papers' encoder for every audio-visual modality).

    Input [B, C, H, W] (a spectrogram as a 1-channel image) or [B, T, C, H, W] (frames): frames are folded into
    the batch, encoded by the 2-D network, and averaged over time and space to one ``8 * width`` vector
    (512 at the paper's width 64). ``stem="imagenet"`` is the 7x7/2 conv + max-pool of the paper;
    ``stem="small"`` a 3x3/1 conv for tiny inputs.
    """

    def __init__(
        self,
        in_channels: PositiveInt = 3,
        width: PositiveInt = 64,
        stem: Annotated[str, Choice("imagenet", "small")] = "imagenet",
    ):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        elif stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        else:
            raise ValueError(f"ResNet18 stem must be 'imagenet' or 'small', got {stem!r}")
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = 8 * width
        init_weights(self)

    # --- stage-wise API (mid-fusion models run two encoders in lockstep; docs/method.md §10) -------------------
    # The stages are the modules the plain forward runs, so parameter names and checkpoints are unchanged.
    num_stages = 4

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of layer1..layer4."""
        return tuple(self.layers[2 * i + 1].conv2.out_channels for i in range(self.num_stages))

    def fold(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(input as a 4-D batch, frames per clip T): [B, T, C, H, W] frames are folded to [B·T, C, H, W]; a
        [B, C, H, W] input (a spectrogram) has T = 1."""
        t = 1
        if x.dim() == 5:
            t = x.shape[1]
            x = x.flatten(0, 1)
        # the input in the model's memory format: NHWC when the model was moved to channels_last, else NCHW. A
        # decoded image is HWC underneath, and an NHWC-strided input would make PyTorch run an NCHW model through
        # NHWC convolution kernels, whose AVX-512 oneDNN backward crashes on some shapes (docs/troubleshooting)
        nhwc = self.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        return x.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format), t

    def stage(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` on a folded batch: 0 = the stem, 1..4 = layer1..layer4 (two BasicBlocks each)."""
        if index == 0:
            return self.stem(h)
        if not 1 <= index <= self.num_stages:
            raise IndexError(f"ResNet18 has stages 0 (stem) to {self.num_stages}, got {index}")
        first = 2 * (index - 1)
        return self.layers[first + 1](self.layers[first](h))

    @staticmethod
    def pool(h: torch.Tensor, frames: int) -> torch.Tensor:
        """Global average of a folded map [B·T, C, H, W] over time and space -> [B, C] (the plain forward's output)."""
        pooled = h.mean(dim=(2, 3))
        return pooled.view(-1, frames, pooled.shape[1]).mean(dim=1) if frames > 1 else pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.dim() == 5
        x, t = self.fold(x)
        h = self.layers(self.stem(x)).mean(dim=(2, 3))  # [B*T, D]
        return h.view(-1, t, h.shape[-1]).mean(dim=1) if frames else h


@configurable("encoder")
class MLPEncoder(nn.Module):
    """Two-layer MLP over a feature vector (the synthetic `sensor` modality)."""

    def __init__(self, in_dim: PositiveInt = 32, hidden: PositiveInt = 64, out_dim: PositiveInt = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim), nn.ReLU(inplace=True)
        )
        self.out_dim = out_dim
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
