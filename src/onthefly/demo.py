"""`python -m onthefly.demo` (`make demo`): the paper's story on the synthetic benchmark, on a CPU in minutes.

Trains joint models (no modulation, OGM-GE, OPM, OPM+OGM) and the two uni-modal models over several seeds,
probes every encoder linearly, and prints mean ± std of fused accuracy, per-modality accuracy (from the
uni-modal logits of the fusion head) and both linear probes. Writes the table (Markdown + CSV), every run's
folder (metrics.csv, steps.csv, results.json, W&B offline run) and the plots under ``--out``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

JOBS = {  # row label -> overrides
    "joint (none)": ["modulation=none"],
    "joint + OGM-GE": ["modulation=ogm_ge"],
    "joint + OPM": ["modulation=opm"],
    "joint + OPM+OGM": ["modulation=opm_ogm"],
    "audio only": ["modulation=none", "trainer.modalities=[audio]"],
    "visual only": ["modulation=none", "trainer.modalities=[visual]"],
}
COLUMNS = {"acc": "fused acc", "acc_audio": "acc audio", "acc_visual": "acc visual",
           "probe_audio": "probe audio", "probe_visual": "probe visual"}


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").replace("__", "_")


def run_job(label: str, overrides: list[str], seed: int, out_root: str) -> dict:
    """One training run + linear probes, in a worker process."""
    import os

    os.environ.setdefault("WANDB_SILENT", "true")  # 18 runs of W&B banners would bury the table
    from onthefly.config import compose
    from onthefly.engine.analysis import probe
    from onthefly.engine.run import train

    cfg = compose([*overrides, f"seed={seed}", f"logger.name=demo-{_slug(label)}-s{seed}"])
    run_dir = Path(out_root) / _slug(label) / f"seed{seed}"
    t0 = time.time()
    results, model, splits = train(cfg, run_dir)
    probes = probe(model, splits, next(model.parameters()).device)
    row = {"method": label, "seed": seed, "run_dir": str(run_dir), "seconds": time.time() - t0}
    row.update({k: v for k, v in results["test"].items() if k.startswith("acc") or k == "map"})
    row.update({f"probe_{m}": p["acc"] for m, p in probes.items()})
    if len(results["modalities"]) == 1:  # a uni-modal model's own accuracy is its modality's accuracy
        row[f"acc_{results['modalities'][0]}"] = row["acc"]
    return row


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """mean ± std (in %) per method, in JOBS order."""
    cols = [c for c in COLUMNS if c in rows]
    grouped = rows.groupby("method", sort=False)[cols]
    mean, std = grouped.mean() * 100, grouped.std(ddof=0) * 100
    table = mean.round(1).astype(str) + " ± " + std.round(1).astype(str)
    table = table.where(mean.notna(), "–")
    return table.rename(columns=COLUMNS)


def to_markdown(table: pd.DataFrame) -> str:
    header = ["method", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(idx), *map(str, row)]) + " |" for idx, row in table.iterrows()]
    return "\n".join(lines)


def make_plots(rows: pd.DataFrame, out: Path) -> list[Path]:
    from onthefly.plots import grouped_bars, line_plot

    paths = []
    probes = rows.groupby("method", sort=False)[["probe_audio", "probe_visual"]]
    names = {"probe_audio": "audio encoder", "probe_visual": "visual encoder"}
    paths.append(grouped_bars((probes.mean() * 100).rename(columns=names), out / "probes.png",
                              "linear-probe test accuracy (%)", "each encoder probed linearly (mean ± std over seeds)",
                              errors=(probes.std(ddof=0) * 100).rename(columns=names)))
    for prefix in ("rho_audio", "k_audio", "q_audio"):
        series = {}
        for label, group in rows.groupby("method", sort=False):
            frames = [pd.read_csv(Path(d) / "steps.csv") for d in group["run_dir"] if (Path(d) / "steps.csv").exists()]
            frames = [f for f in frames if f"train/{prefix}" in f]
            if not frames:
                continue
            per_epoch = pd.concat(frames).groupby("epoch")[f"train/{prefix}"]
            series[label] = (per_epoch.mean().index, per_epoch.mean().values, per_epoch.std(ddof=0).values)
        if series:
            paths.append(line_plot(series, out / f"{prefix}.png", "epoch", prefix.replace("_", " "),
                                   f"{prefix.split('_')[0]} of the audio modality (epoch mean over seeds)",
                                   hline=1.0 if prefix.startswith("rho") else None))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onthefly.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--methods", default=",".join(JOBS), help="comma-separated subset of: " + ", ".join(JOBS))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.epochs=4")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in JOBS]
    if unknown:
        parser.error(f"unknown method {unknown}; choose from {list(JOBS)}")
    out = Path(args.out)
    base = ["experiment=demo", *args.overrides]
    tasks = [(label, base + JOBS[label], seed, str(out)) for label in methods for seed in seeds]
    print(f"onthefly demo: {len(tasks)} runs ({len(methods)} methods x {len(seeds)} seeds), {args.jobs} at a time -> {out}/")
    t0 = time.time()
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_job, *t) for t in tasks]
        for i, fut in enumerate(futures, 1):
            row = fut.result()
            rows.append(row)
            print(f"  [{i:2d}/{len(tasks)}] {row['method']:<16} seed {row['seed']}  test acc {row['acc']:.3f}  "
                  f"({row['seconds']:.0f} s)", flush=True)
    rows = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "runs.csv", index=False)
    table = summarise(rows)
    markdown = to_markdown(table)
    (out / "summary.md").write_text(markdown + "\n")
    plots = make_plots(rows, out)
    print(f"\nsynth_av test set, mean ± std over seeds {args.seeds} (%):\n\n{markdown}\n")
    print(f"wall time {time.time() - t0:.0f} s; table, runs.csv and plots ({', '.join(p.name for p in plots)}) in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
