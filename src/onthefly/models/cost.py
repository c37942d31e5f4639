"""Parameters and FLOPs of a model (``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add).

``python -m onthefly.models.cost`` prints them for every fusion at the CREMA-D shapes of docs/method.md §10.6
(audio 1×257×188 log-STFT, one 3×224×224 frame, ResNet18 at width 64, 6 classes).
"""

from __future__ import annotations

import argparse
from typing import Dict, Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode

from onthefly.config import compose
from onthefly.models import build_model


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_backward_flops(model, inputs: Dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of one training-mode pass of ``inputs`` with a cross-entropy loss."""
    model.train()
    with FlopCounterMode(display=False) as fwd:
        logits = model(inputs)
    forward = fwd.get_total_flops()
    with FlopCounterMode(display=False) as both:
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    del logits
    return forward, both.get_total_flops()


def cost_table(
    fusions: Iterable[str],
    overrides: Iterable[str] = (),
    frames: int = 1,
    batch: int = 2,
    audio_shape=(1, 257, 188),
    image: int = 224,
    num_classes: int = 6,
) -> list[dict]:
    """One row per fusion: parameters (total, encoders, interaction, head) and FLOPs per sample."""
    rows = []
    torch.manual_seed(0)
    inputs = {"audio": torch.randn(batch, *audio_shape), "visual": torch.randn(batch, frames, 3, image, image)}
    labels = torch.zeros(batch, dtype=torch.long)
    for fusion in fusions:
        cfg = compose(["backbone=resnet18", f"fusion={fusion}", *overrides])
        model = build_model(cfg, ["audio", "visual"], num_classes)
        fwd, step = forward_backward_flops(model, inputs, labels)
        interaction = model.interaction
        rows.append(
            {
                "fusion": fusion,
                "params": count_parameters(model),
                "encoders": count_parameters(model.encoders),
                "interaction": count_parameters(interaction) if interaction is not None else 0,
                "head": count_parameters(model.head),
                "gflops_forward": fwd / batch / 1e9,
                "gflops_train_step": step / batch / 1e9,
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusions", default="concat,late_avg,mmtm,centralnet,xattn,vatt_ma")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. fusion.interaction.levels=[1,2,3,4])")
    args = parser.parse_args(argv)
    rows = cost_table(args.fusions.split(","), args.overrides, frames=args.frames)
    base = rows[0]
    print(
        "| fusion | parameters | encoders | interaction | head | GFLOPs forward / sample | GFLOPs train step / sample |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['fusion']} | {r['params']:,} | {r['encoders']:,} | {r['interaction']:,} | {r['head']:,} | "
            f"{r['gflops_forward']:.3f} ({r['gflops_forward'] / base['gflops_forward'] - 1:+.1%}) | "
            f"{r['gflops_train_step']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
