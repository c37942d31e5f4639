"""Analyse a finished run: `python -m onthefly.analyse {probe,robustness,estimator,plots} run_dir=PATH [device=cpu] [seed=0]`.

probe       freeze each encoder, fit a linear classifier on train (L2 chosen on val), report test accuracy (probe.json)
robustness  fused test accuracy when one modality is removed for a fraction r of samples (robustness.json + PNG)
estimator   how often the head's own uni-modal estimator and zero-out name the same dominant modality
plots       ρ / k / q curves from the run's steps.csv (plots/*.png)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onthefly.config import register_configs


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m onthefly.analyse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["probe", "robustness", "estimator", "plots"])
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
        parser.error(
            f"run_dir={opts['run_dir']} is not a folder (expected a run folder written by `python -m onthefly.train`)"
        )
    return args.command, Path(opts["run_dir"]), opts["device"], int(opts["seed"])


def _log_to_wandb(run_dir: Path, kind: str, payload: dict, images: dict) -> None:
    """Log an analysis to a W&B run of its own: job_type ``analysis``, the training run's project, entity and
    group, named ``<training run name>:<kind>``, with ``analysed_run`` (the training run's id) in its config. The
    training run is finished and is never reopened: several offline folders with one run id would replace, not
    append, each other when synced. Offline unless the training run was online (WANDB_MODE wins over both).
    Never fails the command: results.json / <kind>.json are the record."""
    import os

    from onthefly.logging.sinks import open_wandb_run

    results = run_dir / "results.json"
    info = json.loads(results.read_text()).get("wandb") if results.exists() else None
    if not info:
        return
    mode = os.environ.get("WANDB_MODE") or info.get("mode") or "offline"
    config = {
        "analysis": kind,
        "analysed_run": info["id"],
        "analysed_run_dir": str(run_dir.resolve()),
        "choices": json.loads(results.read_text()).get("choices") or {},
    }
    options = {
        "mode": mode,
        "project": info.get("project"),
        "entity": info.get("entity"),
        "group": info.get("group"),
        "job_type": "analysis",
        "name": f"{info.get('name') or info['id']}:{kind}",
        "tags": [kind],
    }
    run, _ = open_wandb_run(run_dir, config, options)
    if run is None:
        return
    try:
        import wandb

        if images:
            run.log({k: wandb.Image(str(v)) for k, v in images.items()})
        run.summary.update(payload)
        run.finish()
    except Exception as err:  # noqa: BLE001
        print(f"note: could not log the {kind} analysis to W&B ({err}); it is in {run_dir}", file=sys.stderr)


def analyse(kind: str, run_dir: Path, device: str = "auto", seed: int = 0) -> dict:
    """Run one analysis of a finished run, write <kind>.json (and plots) into it, and log it to W&B as a run of
    its own beside the training run (same group, job_type analysis)."""
    from onthefly.engine import analysis
    from onthefly.tasks import build_task

    run_dir = Path(run_dir)
    cfg, model, splits, dev = analysis.load_run(run_dir, device)
    task = build_task(cfg, splits)
    images = {}
    if kind == "probe":
        result = analysis.probe(model, splits, dev)
        payload = {f"probe/acc_{m}": r["acc"] for m, r in result.items()}
    elif kind == "robustness":
        curves = analysis.robustness(model, splits, dev, seed=seed, task=task)
        if not curves:
            raise ValueError("robustness needs a model with at least two modalities")
        result = {"ratios": list(analysis.RATIOS), "acc": curves}
        images["robustness"] = analysis.plot_robustness(curves, run_dir / "plots" / "robustness.png")
        payload = {f"robustness/acc_{m}@{r}": a for m, accs in curves.items() for r, a in zip(analysis.RATIOS, accs)}
    elif kind == "estimator":
        result = analysis.estimator_agreement(model, splits, dev, task=task)
        payload = {f"estimator/{k}": v for k, v in result.items()}
    else:
        raise ValueError(f"unknown analysis {kind!r}; choose probe, robustness or estimator")
    (run_dir / f"{kind}.json").write_text(json.dumps(result, indent=2))
    _log_to_wandb(run_dir, kind, payload, images)
    return result


def robustness_table(result: dict) -> str:
    """The robustness curves as aligned text: one column per removed fraction r, one row per removed modality,
    fused test accuracy in each cell."""
    ratios, curves = result["ratios"], result["acc"]
    first = max([len("removed"), *(len(m) for m in curves)])
    header = f"{'removed':<{first}}  " + "  ".join(f"{'r=' + format(r, '.1f'):>6}" for r in ratios)
    lines = ["fused test accuracy with the modality removed from a fraction r of the test samples:", header]
    lines += [f"{m:<{first}}  " + "  ".join(f"{a:>6.4f}" for a in accs) for m, accs in curves.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    command, run_dir, device, seed = _parse(argv)
    register_configs()
    from onthefly.plots import run_plots

    if command == "plots":
        paths = run_plots(run_dir)
        print(
            "\n".join(map(str, paths))
            or f"nothing to plot: {run_dir} has no steps.csv with rho/k/q columns "
            "(a uni-modal run, or logger.log_steps=false)"
        )
        return 0
    from onthefly.engine.errors import TrainingError

    try:
        result = analyse(command, run_dir, device, seed)
    except (ValueError, TrainingError) as err:
        print(err, file=sys.stderr)
        return 2
    if command == "probe":
        for m, r in result.items():
            print(f"probe/acc_{m}: {r['acc']:.4f}  (val {r['val_acc']:.4f}, l2 {r['l2']:g})")
    elif command == "robustness":
        print(robustness_table(result))
        print(f"plot: {run_dir / 'plots' / 'robustness.png'}")
    else:
        for k, v in result.items():
            print(f"estimator/{k}: {v:.4f}" if isinstance(v, float) else f"estimator/{k}: {v}")
        if not result:
            print("this head has no natural estimator to compare with zero-out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
