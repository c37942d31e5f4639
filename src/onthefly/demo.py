"""`python -m onthefly.demo` (`make demo`): the paper's story on the synthetic benchmark, on a CPU in minutes.

Runs the table `experiments/demo.yaml` through the table machinery (the same path as `make reproduce-table-demo`):
joint models (no modulation, OGM-GE, OPM, OPM+OGM) and the two uni-modal models, every seed of the spec, as one
multirun on the parallel launcher (two jobs at a time, one thread each), then the linear probes of every encoder,
then the table. Prints mean ± std over seeds of fused accuracy, per-modality accuracy (the fusion head's uni-modal
logits) and both probes, and, per method, the paired difference to joint training (the method's run minus the
joint run of the same seed, mean ± std over seeds, and in how many seeds it is positive).

Writes everything under ``<results>/demo/``: the demo table (demo.md), the table machinery's files (table.md,
records.csv, plots/), every run's folder (runs/<row>__synth_av/seed<k>/: metrics.csv, steps.csv, results.json,
probe.json, best.pt, W&B offline run). Finished runs are reused (an interrupted demo goes on where it stopped).

The table committed in docs/demo.md (and shown in README.md) is what this command printed on the machine named
there; the demo says whether a fresh table differs from it, and ``--update-docs`` rewrites it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import pandas as pd

SPEC = "demo"
JOINT = "none"  # the reference row of the paired differences
REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "demo.md"
README = REPO / "README.md"
BEGIN = "<!-- demo-table:begin -->"
END = "<!-- demo-table:end -->"
# column -> the record key it shows (the table machinery's value keys); a uni-modal run's accuracy is also its
# modality's accuracy
COLUMNS = {
    "fused acc": "test/acc",
    "acc audio": "test/acc_audio",
    "acc visual": "test/acc_visual",
    "probe audio": "probe/acc_audio",
    "probe visual": "probe/acc_visual",
}
PAIRED = {
    "Δ fused acc": "fused acc",
    "Δ probe audio": "probe audio",
    "Δ probe visual": "probe visual",
}  # paired, vs joint


# --- the table -------------------------------------------------------------------------------------------------
def _values(records: pd.DataFrame) -> pd.DataFrame:
    """One line per (row, seed): every column's value in %, and the selected epoch. ``records`` may hold
    ``modalities`` (a uni-modal run's one modality, else None)."""
    nan = pd.Series(float("nan"), index=records.index)
    single = records["modalities"] if "modalities" in records else pd.Series(None, index=records.index)
    table = pd.DataFrame({"row": records["row"], "seed": records["seed"]})
    for name, key in COLUMNS.items():
        values = pd.to_numeric(records[key], errors="coerce") if key in records else nan
        if key.startswith("test/acc_"):
            own = single == key.split("_", 1)[1]
            values = values.where(~own, pd.to_numeric(records["test/acc"], errors="coerce"))
        table[name] = values * 100
    table["selected epoch"] = pd.to_numeric(records["best/epoch"], errors="coerce") if "best/epoch" in records else nan
    return table


def _mean_std(values: pd.Series) -> str:
    v = values.dropna()
    if not len(v):
        return "–"
    return f"{v.mean():.1f} ± {v.std(ddof=0):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def _paired(method: pd.DataFrame, joint: pd.DataFrame, column: str) -> str:
    """Per seed: method minus joint (same seed); mean ± std (population) and how many seeds are positive."""
    both = pd.merge(method[["seed", column]], joint[["seed", column]], on="seed", suffixes=("", "_joint")).dropna()
    if not len(both):
        return "–"
    diff = both[column] - both[f"{column}_joint"]
    spread = f" ± {diff.std(ddof=0):.1f}" if len(diff) > 1 else ""
    return f"{diff.mean():+.1f}{spread} ({int((diff > 0).sum())}/{len(diff)})"


def demo_table(records: pd.DataFrame, rows: list[tuple[str, str]]) -> pd.DataFrame:
    """The demo's table from the table machinery's records (``aggregate.local_records``): one line per spec row
    (``rows``: (id, label) in display order); mean ± std over seeds per column, the paired differences to the
    joint row, and the range of the selected (best-on-val) epochs."""
    values = _values(records)
    joint = values[values["row"] == JOINT]
    lines = {}
    for rid, label in rows:
        mine = values[values["row"] == rid]
        line = {name: _mean_std(mine[name]) for name in COLUMNS}
        for name, column in PAIRED.items():
            line[name] = "ref." if rid == JOINT else _paired(mine, joint, column)
        epochs = mine["selected epoch"].dropna()
        line["selected epoch"] = f"{int(epochs.min())}–{int(epochs.max())}" if len(epochs) else "–"
        lines[label] = line
    table = pd.DataFrame.from_dict(lines, orient="index")
    table.index.name = "method"
    return table


def to_markdown(table: pd.DataFrame) -> str:
    header = [table.index.name or "", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(idx), *map(str, row)]) + " |" for idx, row in table.iterrows()]
    return "\n".join(lines)


# --- the committed copy ------------------------------------------------------------------------------------------
def read_block(path: Path) -> Optional[str]:
    """The text between the demo-table markers of ``path`` (None when the file or a marker is missing)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def table_lines(block: Optional[str]) -> list[str]:
    """The Markdown table rows of a block (the measured-on line and prose left out)."""
    return [line.strip() for line in (block or "").splitlines() if line.strip().startswith("|")]


def write_block(path: Path, block: str) -> bool:
    """Replace the marked block of ``path``; False when the file has no markers (it is then left alone)."""
    text = Path(path).read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    Path(path).write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    return True


def compare(fresh: str, committed: Optional[str]) -> tuple[bool, list[str]]:
    """(same, lines that say how they differ) for two table blocks, comparing only the table rows."""
    if committed is None:
        return False, [f"there is no committed table to compare with ({DOCS} has no {BEGIN} … {END} block)"]
    new, old = table_lines(fresh), table_lines(committed)
    if new == old:
        return True, []
    lines = []
    old_rows = {line.split("|")[1].strip(): line for line in old[2:]}
    for line in new[2:]:
        name = line.split("|")[1].strip()
        if old_rows.get(name) != line:
            lines.append(f"  now:       {line}")
            lines.append(f"  committed: {old_rows.get(name, '(no such row)')}")
    if new[:1] != old[:1]:
        lines.insert(0, f"  columns now: {new[0] if new else '-'}\n  committed:   {old[0] if old else '-'}")
    return False, lines


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"


def block_text(
    table_md: str,
    seeds: list[int],
    epochs: int,
    wall_s: float,
    jobs: int,
    trained: int,
    total: int,
    command: str = "make demo",
) -> str:
    """The committed block: the table, what it is, and where and how fast it was measured."""
    minutes, seconds = divmod(int(round(wall_s)), 60)
    reused = "" if trained == total else f"; {total - trained} of the {total} runs were reused from an earlier demo"
    return (
        f"{table_md}\n\n"
        f"synth_av test set, in %, checkpoint selected on val: mean ± std (population) over seeds "
        f"{','.join(map(str, seeds))}, {epochs} epochs per run. Δ: the method's run minus the joint run of the "
        f"same seed, mean ± std over those seeds, (k/n): in k of the n seeds it is positive. Selected epoch: "
        f"lowest–highest over the seeds (the first epoch is 0).\n"
        f"Measured: `{command}`, {total} runs, {jobs} at a time with one thread each, wall time "
        f"{minutes} min {seconds:02d} s{reused}; {machine()}."
    )


# --- running it --------------------------------------------------------------------------------------------------
def _analyse_cells(spec_path: str, results: str, seeds: list[int], row_ids: list[str]) -> None:
    """The table machinery's post-training analyses for some rows (one worker of the demo's pool)."""
    import torch

    from onthefly.tables import sweep
    from onthefly.tables.spec import load_spec

    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_SILENT", "true")
    spec = load_spec(spec_path)
    cells = [c for c in sweep.plan(spec, seeds, Path(results)) if c.row.id in row_ids]
    sweep.run_analyses(spec, cells, seeds, log=lambda line: None)


def run_analyses(spec, cells, seeds: list[int], results: Path, jobs: int) -> None:
    """``sweep.run_analyses`` for every cell, the rows shared out over ``jobs`` processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    row_ids = [c.row.id for c in cells]
    if jobs <= 1 or len(row_ids) <= 1:
        _analyse_cells(str(spec.path), str(results), seeds, row_ids)
        return
    shares = [row_ids[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        for future in [pool.submit(_analyse_cells, str(spec.path), str(results), seeds, share) for share in shares]:
            future.result()


def default_results(overrides: list[str]) -> Path:
    """``outputs`` for the demo as it is; a folder of its own for each set of overrides (so that runs with other
    settings are never mixed with, or reused as, the demo's)."""
    if not overrides:
        return Path("outputs")
    digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    return Path("outputs") / "demo-variants" / digest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onthefly.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the spec's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each; default 2)")
    parser.add_argument(
        "--results",
        default=None,
        help="results root; the demo writes <results>/demo/ (default: outputs, or "
        "outputs/demo-variants/<hash> with overrides)",
    )
    parser.add_argument(
        "--wandb",
        default="offline",
        choices=["offline", "online", "disabled"],
        help="where the table itself is logged (each run follows logger.mode)",
    )
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again (once the cause is fixed)")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"write this table into {DOCS.relative_to(REPO)} and README.md (between the demo-table markers)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.epochs=4")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")  # dozens of W&B banners would bury the table

    from onthefly.config import compose
    from onthefly.tables import aggregate, sweep
    from onthefly.tables.__main__ import build
    from onthefly.tables.spec import SpecError, load_spec, spec_path

    spec = load_spec(spec_path(SPEC))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(spec.seeds)
    default = not args.overrides and seeds == list(spec.seeds)
    if args.update_docs and not default:
        parser.error("--update-docs writes the demo's default table: no seeds or overrides with it")
    results = Path(args.results) if args.results else default_results(args.overrides)
    jobs = max(1, args.jobs)
    epochs = int(compose([f"experiment={spec.columns[0].preset}", *args.overrides]).trainer.epochs)
    total = len(spec.run_cells()) * len(seeds)

    def say(line: str) -> None:
        if not line.startswith("  #"):  # the per-job override lists: in sweep.log and the run folders
            print(line, flush=True)

    print(
        f"onthefly demo: {len(spec.rows)} methods x {len(seeds)} seeds = {total} runs of {epochs} epochs on "
        f"synth_av, {jobs} at a time, through the table machinery (experiments/demo.yaml) -> {results / SPEC}/",
        flush=True,
    )
    t0 = time.time()
    todo = len(sweep.to_run(sweep.plan(spec, seeds, results, sweep.data_root(args.overrides))))
    if todo < total:
        print(
            f"{total - todo} of the {total} runs are already done in {results / SPEC}/ (an earlier demo): reused; "
            "remove that folder to train them again",
            flush=True,
        )
    try:
        cells = sweep.run_sweep(
            spec,
            seeds,
            "parallel",
            [f"hydra.launcher.n_jobs={jobs}", *args.overrides],
            results,
            retry_failed=args.retry_failed,
            log=say,
        )
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [j for j in sweep.all_jobs(cells) if j.state == sweep.FAILED]
    unfinished = [j for j in sweep.all_jobs(cells) if j.state not in (sweep.DONE, sweep.FAILED)]
    if failed or unfinished:
        print("\n".join(sweep.failure_lines(cells)), file=sys.stderr)
        if unfinished:
            print(
                f"{len(unfinished)} run(s) ended without a result: "
                + ", ".join(j.name for j in unfinished[:6])
                + f" (see {results / SPEC / 'sweep.log'})",
                file=sys.stderr,
            )
        print(
            f"error: {len(failed) + len(unfinished)} demo run(s) did not finish (see above); finished runs are "
            "kept, and the next `make demo` runs only what is missing (failed runs with --retry-failed, once the "
            "cause is fixed)",
            file=sys.stderr,
        )
        return 1
    print("linear probes of every encoder …", flush=True)
    run_analyses(spec, cells, seeds, results, jobs)
    build(spec, results, seeds, wandb_mode=args.wandb, log=lambda line: None, root=sweep.data_root(args.overrides))
    records = aggregate.local_records(spec, results, seeds)
    records["modalities"] = [_modalities(d) for d in records["run_dir"]]
    table = demo_table(records, [(r.id, r.label or r.id) for r in spec.rows])
    wall = time.time() - t0
    markdown = to_markdown(table)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--update-docs"]
    command = "make demo" if not given else "python -m onthefly.demo " + " ".join(given)
    block = block_text(markdown, seeds, epochs, wall, jobs, todo, total, command)
    out = results / SPEC
    (out / "demo.md").write_text(block + "\n")
    print(f"\n{block}\n")
    if not default:
        print(f"(custom seeds or overrides: not compared with the committed table in {DOCS.relative_to(REPO)})")
    else:
        same, diff = compare(block, read_block(DOCS))
        if same:
            print(f"This table equals the committed one in {DOCS.relative_to(REPO)} (and the README).")
        else:
            print(f"This table DIFFERS from the committed one in {DOCS.relative_to(REPO)} (and the README):")
            print("\n".join(diff))
            print(
                "Another CPU, torch version or BLAS can change the last digits; a different story is a bug. "
                "`python -m onthefly.demo --update-docs` writes this table there."
            )
    if args.update_docs:
        written = [str(p.relative_to(REPO)) for p in (DOCS, README) if p.exists() and write_block(p, block)]
        print(f"wrote the table into {', '.join(written) or 'nothing (no demo-table markers found)'}")
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    print(f"wall time {wall:.0f} s; {out}/demo.md, table.md, records.csv, plots/ ({', '.join(plots)}), runs/")
    return 0


def _modalities(run_dir: str) -> Optional[str]:
    """The modality of a uni-modal run (None for a multimodal one), from its results.json."""
    import json

    try:
        mods = json.loads((Path(run_dir) / "results.json").read_text()).get("modalities") or []
    except (OSError, ValueError):
        return None
    return mods[0] if len(mods) == 1 else None


if __name__ == "__main__":
    raise SystemExit(main())
