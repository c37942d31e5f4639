"""Smallest reproduction found of a oneDNN crash that onthefly works around (`trainer.channels_last: auto`).

An upstream bug, kept as a script (not a test): with torch 2.14.1 (oneDNN v3.12.0, CPU capability AVX512), the
weight gradient of a 1x1, stride-2 convolution over 8 input channels, in NHWC (channels_last) layout, at a
256 x 16 input, dies with a segmentation fault on CPUs with AVX-512 (seen on an Intel Xeon, Sapphire Rapids,
and reported on an AMD EPYC with avx512f/bw/vl/vnni). The same call passes in NCHW layout, and passes with
ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN limited to AVX2 kernels). A CPU without AVX-512 never takes that kernel.

In onthefly this is the shortcut convolution of the first stride-2 block of the width-8 ResNet18 (the CPU
default) on a Kinetics-Sounds fbank input (1 x 1024 x 128 after the stem: 8 x 256 x 32). A model kept in NCHW
takes the same NHWC kernels when its INPUT has NHWC strides (a decoded HWC image permuted to CHW): PyTorch's
convolution follows the input's layout. That crashed the visual encoder on CREMA-D's 3 x 224 x 224 frames
("double free or corruption" in backward), so ResNet18 makes its input contiguous in the model's own layout.

    python docs/troubleshooting/onednn_nhwc_segfault.py                        # exit code 139 on affected CPUs
    ONEDNN_MAX_CPU_ISA=AVX2 python docs/troubleshooting/onednn_nhwc_segfault.py   # prints "ok"
    python docs/troubleshooting/onednn_nhwc_segfault.py --nchw                 # prints "ok"

Shapes probed on the Xeon above (batch 1, out channels 8 or 16 crash; 32 does not; 256 x 8, 128 x 16, 2 x 32
do not): the crash needs that particular blocking of channels and spatial size, so other models may or may not
meet it. Run this script after a torch upgrade to see whether the bug is still there.
"""
import subprocess
import sys

import torch


def weight_grad(nchw: bool) -> None:
    torch.set_num_threads(1)
    x = torch.randn(1, 8, 256, 16)
    w = torch.randn(8, 8, 1, 1, requires_grad=True)
    if not nchw:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w.detach()))
        w.requires_grad_(True)
    y = torch.nn.functional.conv2d(x, w, stride=2)
    torch.autograd.grad(y, w, torch.ones_like(y))


if __name__ == "__main__":
    if "--child" in sys.argv:
        weight_grad(nchw="--nchw" in sys.argv)
        sys.exit(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    # in a child process, so a crash is reported instead of ending this script
    rc = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]]).returncode
    layout = "NCHW" if "--nchw" in sys.argv else "NHWC (channels_last)"
    if rc == 0:
        print(f"ok: the {layout} weight gradient ran")
    else:
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        print(f"crashed ({how}): the oneDNN bug is present on this CPU; "
              "onthefly avoids it with trainer.channels_last=auto (off on CPU)")
    sys.exit(0 if rc == 0 else 1)
