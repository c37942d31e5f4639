"""Analyse a finished run: `python -m onthefly.evaluate {probe,robustness,plots} run_dir=PATH [device=cpu] [seed=0]`.

probe       freeze each encoder, fit a linear classifier on train (L2 chosen on val), report test accuracy (probe.json)
robustness  fused test accuracy when one modality is removed for a fraction r of samples (robustness.json + PNG)
plots       ρ / k / q curves from the run's steps.csv (plots/*.png)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onthefly.config import register_configs


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m onthefly.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["probe", "robustness", "plots"])
    parser.add_argument("overrides", nargs="*", help="run_dir=PATH (required), device=auto, seed=0")
    args = parser.parse_args(argv)
    opts = {"device": "auto", "seed": "0"}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in ("run_dir", "device", "seed"):
            parser.error(f"expected run_dir=PATH, device=... or seed=N, got {item!r}")
        opts[key] = value
    if "run_dir" not in opts:
        parser.error("run_dir=PATH is required (a folder written by `python -m onthefly.train`)")
    if not Path(opts["run_dir"]).is_dir():
        parser.error(f"run_dir={opts['run_dir']} is not a folder (expected a run folder written by `python -m onthefly.train`)")
    return args.command, Path(opts["run_dir"]), opts["device"], int(opts["seed"])


def _log_to_wandb(run_dir: Path, payload: dict, images: dict) -> None:
    """Attach results to the run's own W&B run (resumed offline) when it has one; never fails the command."""
    results = run_dir / "results.json"
    info = json.loads(results.read_text()).get("wandb") if results.exists() else None
    if not info:
        return
    try:
        import wandb

        run = wandb.init(id=info["id"], project=info["project"], dir=str(run_dir), mode="offline", resume="allow")
        run.summary.update(payload)
        run.log({k: wandb.Image(str(v)) for k, v in images.items()})
        run.finish()
    except Exception as err:  # noqa: BLE001
        print(f"note: could not add results to the W&B run ({err}); they are in {run_dir}", file=sys.stderr)


def main(argv=None) -> int:
    command, run_dir, device, seed = _parse(argv)
    register_configs()
    from onthefly.engine import analysis
    from onthefly.plots import run_plots

    if command == "plots":
        paths = run_plots(run_dir)
        print("\n".join(map(str, paths)) or f"nothing to plot: {run_dir} has no steps.csv with rho/k/q columns "
              "(a uni-modal run, or logger.log_steps=false)")
        return 0
    cfg, model, splits, dev = analysis.load_run(run_dir, device)
    if command == "probe":
        result = analysis.probe(model, splits, dev)
        (run_dir / "probe.json").write_text(json.dumps(result, indent=2))
        for m, r in result.items():
            print(f"probe/acc_{m}: {r['acc']:.4f}  (val {r['val_acc']:.4f}, l2 {r['l2']:g})")
        _log_to_wandb(run_dir, {f"probe/acc_{m}": r["acc"] for m, r in result.items()}, {})
    else:
        curves = analysis.robustness(model, splits, dev, seed=seed)
        if not curves:
            print("robustness needs a model with at least two modalities", file=sys.stderr)
            return 2
        (run_dir / "robustness.json").write_text(json.dumps({"ratios": list(analysis.RATIOS), "acc": curves}, indent=2))
        png = analysis.plot_robustness(curves, run_dir / "plots" / "robustness.png")
        print("r    " + "  ".join(f"{r:4.1f}" for r in analysis.RATIOS))
        for m, accs in curves.items():
            print(f"{m:<5}" + "  ".join(f"{a:4.2f}" for a in accs))
        print(f"plot: {png}")
        _log_to_wandb(run_dir, {f"robustness/acc_{m}_r1": accs[-1] for m, accs in curves.items()}, {"robustness": png})
    return 0


if __name__ == "__main__":
    sys.exit(main())
