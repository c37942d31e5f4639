"""Smallest reproduction found of a wrong result in oneDNN's AMX bfloat16 convolution, which onthefly works around
(a bf16 run on a CPU with AMX limits oneDNN to its AVX512_CORE_BF16 kernels and checks a bf16 convolution first).

An upstream bug, kept as a script (not a test): with torch 2.14.1 (oneDNN v3.12.0) on an Intel Xeon with AMX
(amx_bf16, Sapphire Rapids; the same bf16 run also gave NaN losses with torch 2.11.0 on an H200 host's CPU), a 3x3 stride-2 convolution of a bfloat16
input of 64 x 32 x 5 x 2 returns values near 1e37 or NaN (the width-8 ResNet18's last stage on the synthetic benchmark
at batch 64). The same call is right with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (or AVX512_CORE, AVX2), at batch 8, or
at larger spatial sizes. A CPU without AMX never takes that kernel.

    python docs/troubleshooting/onednn_amx_bf16_conv.py                                      # wrong on AMX CPUs
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python docs/troubleshooting/onednn_amx_bf16_conv.py  # right

(`grep -o amx_bf16 /proc/cpuinfo | head -1` says whether the CPU has AMX.)
"""

import torch
import torch.nn.functional as F

torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randn(64, 32, 5, 2).bfloat16()
w = (torch.randn(64, 32, 3, 3) * 0.05).bfloat16()
y = F.conv2d(x, w, stride=2, padding=1).float()
ref = F.conv2d(x.float(), w.float(), stride=2, padding=1)  # the same bf16 values, computed in float32
err = (y - ref).abs().nan_to_num(float("inf")).max().item()
print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
print(f"bf16 conv of 64x32x5x2, 3x3 stride 2: max |error| {err:.3g}, NaN {int(torch.isnan(y).sum())} of {y.numel()}")
print("WRONG: this torch and CPU have the bug" if err > 0.1 else "right: no sign of the bug here")
