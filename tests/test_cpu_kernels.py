"""CPU kernels differ between machines (AVX-512 or not): the shapes that crashed oneDNN's AVX-512 NHWC convolution
backward must train on every kernel set. Each case runs in a subprocess (a crash is an exit code, not a dead test
run), once with the kernels this CPU offers and once limited to AVX2 (ONEDNN_MAX_CPU_ISA), and both must give the
same gradients to rounding."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from onthefly.models.encoders import ResNet18

from conftest import subprocess_env

CASE = r"""
import json, sys, torch
from onthefly.config import compose
from onthefly.engine.build import build
torch.manual_seed(0)
which = sys.argv[1]
cfg = compose(["backbone=resnet18_small", "trainer.threads=1", "trainer.device=cpu"])  # default channels_last: auto
model = build(cfg, torch.device("cpu")).model.train()
enc = model.encoders["audio" if which != "frames" else "visual"]
if which == "fbank":    # Kinetics-Sounds audio: 1 x 1024 x 128 (crashed in the 1x1 stride-2 shortcut's weight grad)
    x = torch.randn(3, 1, 1024, 128)
elif which == "stft":   # CREMA-D audio: 1 x 257 x 188
    x = torch.randn(4, 1, 257, 188)
else:                   # frames decoded as HWC and permuted to CHW (NHWC strides): CREMA-D's 3 x 224 frames
    x = torch.randn(4, 3, 224, 224, 3).permute(0, 1, 4, 2, 3)
enc(x).square().sum().backward()
print(json.dumps({n: float(p.grad.norm()) for n, p in enc.named_parameters() if p.dim() == 4}))
"""


def _grads(which: str, isa: str | None) -> dict:
    env = subprocess_env()
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    proc = subprocess.run([sys.executable, "-c", CASE, which], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{which} with ONEDNN_MAX_CPU_ISA={isa or 'default'} exited {proc.returncode}: {proc.stderr[-1500:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fbank", "stft", "frames"])
def test_the_shapes_that_crashed_train_on_every_kernel_set(which):
    native, avx2 = _grads(which, None), _grads(which, "AVX2")
    assert native.keys() == avx2.keys()
    for name in native:
        assert native[name] == pytest.approx(avx2[name], rel=1e-3), name


def test_an_nchw_model_gets_nchw_input_whatever_the_input_strides():
    enc = ResNet18(in_channels=3, width=8)
    hwc = torch.randn(2, 3, 32, 32, 3).permute(0, 1, 4, 2, 3)  # [B, T, C, H, W] with NHWC strides, as decoded
    folded, t = enc.fold(hwc)
    assert t == 3 and folded.is_contiguous() and torch.equal(folded, hwc.flatten(0, 1))
    enc = enc.to(memory_format=torch.channels_last)
    folded, _ = enc.fold(hwc)
    assert folded.is_contiguous(memory_format=torch.channels_last)
