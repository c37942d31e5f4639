"""Frame transforms shared by every dataset with a visual stream (docs/data.md: train crop + flip, eval resize).

A small hand-rolled pipeline instead of torchvision's v2 containers: the same operations (torchvision's
RandomResizedCrop parameter sampling, antialiased bilinear resize, horizontal flip, ImageNet normalisation)
at about a quarter of the per-clip cost, which matters when clips are transformed one by one on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) as torchvision's RandomResizedCrop samples it (10 tries, then a centre crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,)).item()
            left = torch.randint(0, width - w + 1, (1,)).item()
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's Resize(size) (short side to ``size``, aspect kept) then CenterCrop(size): float [..., H, W]."""
    height, width = x.shape[-2:]
    if height <= width:
        new = (size, int(size * width / height))
    else:
        new = (int(size * height / width), size)
    x = _resize(x, new)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return x[..., top : top + size, left : left + size]


class FrameTransform:
    """uint8 frames [T, 3, H, W] -> normalised float frames [T, 3, size, size].

    Training: RandomResizedCrop(size, scale) + horizontal flip (p = 0.5), by default one set of random parameters
    per clip, so every frame of a clip gets the same crop and flip; ``per_frame``: each frame its own (the CVPR
    VGGSound and Kinetics-Sounds loaders, which transform frame by frame). Evaluation: ``eval_resize`` ``squash``
    (Resize((size, size)), the CVPR loaders) or ``crop`` (Resize(size) then CenterCrop(size), the journal's
    Kinetics-Sounds loader).
    """

    def __init__(
        self,
        train: bool,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        per_frame: bool = False,
        eval_resize: str = "squash",
    ):
        if eval_resize not in ("squash", "crop"):
            raise ValueError(f"eval_resize must be squash or crop, got {eval_resize!r}")
        self.train, self.size, self.scale = train, size, tuple(scale)
        self.per_frame, self.eval_resize = per_frame, eval_resize
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def _augment(self, frames: torch.Tensor) -> torch.Tensor:
        """One random crop box and flip for ``frames`` [t, 3, H, W] -> float [t, 3, size, size]."""
        height, width = frames.shape[-2:]
        top, left, h, w = random_resized_crop_box(height, width, self.scale)
        x = _resize(frames[..., top : top + h, left : left + w].float(), (self.size, self.size))
        if torch.rand(()).item() < 0.5:
            x = x.flip(-1)
        return x

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if self.train and self.per_frame:
            x = torch.cat([self._augment(frames[t : t + 1]) for t in range(frames.shape[0])])
        elif self.train:
            x = self._augment(frames)
        elif self.eval_resize == "crop":
            x = resize_centre_crop(frames.float(), self.size)
        else:
            x = _resize(frames.float(), (self.size, self.size))
        return (x - self.mean) / self.std

    def precompute(self, clips: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Evaluation transform of a whole split at once: uint8 [N, T, 3, H, W] -> float [N, T, 3, size, size].

        Only for the deterministic (evaluation) transform, so a dataset can pay it once instead of every epoch.
        """
        if self.train:
            raise ValueError("precompute() is for the evaluation transform; training crops are random per clip")
        n, t = clips.shape[:2]
        out = [self(part.flatten(0, 1)).view(-1, t, 3, self.size, self.size) for part in clips.split(chunk)]
        return torch.cat(out) if out else clips.new_zeros((0, t, 3, self.size, self.size), dtype=torch.float32)

    def __repr__(self) -> str:
        return (
            f"FrameTransform(train={self.train}, size={self.size}, scale={self.scale}, "
            f"per_frame={self.per_frame}, eval_resize={self.eval_resize})"
        )


def frame_transform(
    train: bool,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    per_frame: bool = False,
    eval_resize: str = "squash",
) -> FrameTransform:
    return FrameTransform(train, size, scale, per_frame, eval_resize)
