"""CPU kernels differ between machines (AVX-512 or not, AMX or not): the shapes that crashed oneDNN's AVX-512 NHWC
convolution backward must train on every kernel set, and a bf16 run must not meet the AMX bf16 convolution that returns
garbage. Each case runs in a subprocess (a crash is an exit code, not a dead test run; oneDNN fixes its kernel set
once per process), with the kernels this CPU offers and limited by ONEDNN_MAX_CPU_ISA, and the results must agree."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from onthefly.engine import build as builder
from onthefly.engine.errors import TrainingError
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


# --- bf16 on a CPU: oneDNN's AMX convolution -----------------------------------------------------------------------
# The run that showed it: debug=fast (batch 64) with trainer.precision=bf16 on a Xeon with AMX; 3 of its 6 steps had a
# NaN loss and the others trained on garbage (a 3x3 stride-2 conv of the width-8 ResNet18's last stage, 64x32x5x2).
BF16_RUN = ["debug=fast", "trainer.precision=bf16", "trainer.epochs=1", "trainer.threads=1", "trainer.plots=false"]


def _bf16_run(tmp_path, isa: str | None) -> dict:
    env = subprocess_env()
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = tmp_path / (isa or "native")
    cmd = [sys.executable, "-m", "onthefly.train", *BF16_RUN, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"bf16 run with ONEDNN_MAX_CPU_ISA={isa or 'default'}: {proc.stderr[-1500:]}"
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_a_bf16_cpu_run_has_finite_steps_on_every_kernel_set(tmp_path):
    native, avx2 = _bf16_run(tmp_path, None), _bf16_run(tmp_path, "AVX2")
    for results in (native, avx2):
        assert results["status"] == "ok" and results["nonfinite_steps"] == 0
    # same data, same init: the first epoch's loss agrees to bf16 rounding whichever kernels computed it
    assert native["test"]["loss"] == pytest.approx(avx2["test"]["loss"], rel=0.05)


def test_the_bf16_check_catches_a_wrong_convolution_and_names_the_fix(monkeypatch):
    real = torch.nn.functional.conv2d

    def amx_like(x, w, *args, **kwargs):  # what the AMX kernel returned: values near 1e37 in a bf16 conv
        y = real(x, w, *args, **kwargs)
        return y + 1e37 if x.dtype == torch.bfloat16 else y

    monkeypatch.setattr(torch.nn.functional, "conv2d", amx_like)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # the user's choice: left alone, still checked
    with pytest.raises(TrainingError, match="ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16") as err:
        builder.check_cpu_bf16("bf16", torch.device("cpu"))
    assert "trainer.precision=32" in str(err.value)


def test_the_bf16_check_leaves_other_runs_alone(monkeypatch):
    monkeypatch.setattr(builder, "bf16_conv_is_right", lambda: pytest.fail("checked a run that is not bf16 on a CPU"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        builder.check_cpu_bf16("32", torch.device("cpu"))
        builder.check_cpu_bf16("fp16", torch.device("cpu"))
        builder.check_cpu_bf16("bf16", torch.device("cuda"))


def test_a_bf16_conv_is_right_on_this_process_kernels():
    # this process's kernels are those a bf16 run would use (conftest caps oneDNN on a CPU with AMX, as the CLI does)
    assert builder.bf16_conv_is_right()
