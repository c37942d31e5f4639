"""Expand a table spec into Hydra multirun jobs, launch them, and run the post-training analyses.

Each (row, column) cell is one Hydra multirun over its missing seeds, written to
``<results>/<table>/runs/<row>__<column>/seed<k>/``; a seed whose results.json says status ok is skipped, so a
sweep can be stopped and started again. W&B: group = table name, tags = [row, column], job_type = the method.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from onthefly.tables.spec import Column, Row, TableSpec

RESULTS_DIR = Path(__file__).resolve().parents[3] / "experiments" / "results"

LAUNCHERS = {  # --launcher -> Hydra overrides (the plugins are hydra-joblib-launcher / hydra-submitit-launcher)
    "local": [],
    "joblib": ["hydra/launcher=joblib"],
    "submitit_local": ["hydra/launcher=submitit_local"],
    "slurm": ["hydra/launcher=submitit_slurm"],
}


@dataclass
class CellPlan:
    row: Row
    col: Column
    cell_dir: Path
    done: list[int]
    missing: list[int]
    no_data: Optional[str] = None  # why the cell cannot run


def cell_dir(results: Path, spec: TableSpec, row: Row, col: Column) -> Path:
    return results / spec.name / "runs" / f"{row.id}__{col.id}"


def run_ok(run_dir: Path) -> bool:
    path = run_dir / "results.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except json.JSONDecodeError:
        return False


def data_root() -> Path:
    return Path(os.environ.get("ONTHEFLY_DATA", "data"))


def plan(spec: TableSpec, seeds: list[int], results: Path = RESULTS_DIR, root: Optional[Path] = None) -> list[CellPlan]:
    root = root or data_root()
    out = []
    for row, col in spec.run_cells():
        d = cell_dir(results, spec, row, col)
        done = [s for s in seeds if run_ok(d / f"seed{s}")]
        missing = [s for s in seeds if s not in done]
        no_data = None
        if col.pending:
            no_data = f"not available yet: {col.pending}"
        elif col.data and not (root / col.data).exists():
            no_data = f"no data: run {col.prep or 'the prep command for ' + col.data} (looked in {root / col.data})"
        out.append(CellPlan(row, col, d, done, missing, no_data))
    return out


def cell_command(spec: TableSpec, cell: CellPlan, launcher: str, extra: list[str]) -> list[str]:
    seeds = ",".join(map(str, cell.missing))
    return [
        sys.executable, "-m", "onthefly.train", "-m",
        *spec.cell_overrides(cell.row, cell.col),
        f"seed={seeds}",
        f"logger.group={spec.name}",
        f"logger.tags=[{cell.row.id},{cell.col.id}]",
        f"name={spec.name}:{cell.row.id}:{cell.col.id}:s" + "${seed}",
        f"hydra.sweep.dir={cell.cell_dir}",
        "hydra.sweep.subdir=seed${seed}",
        *LAUNCHERS[launcher],
        *extra,
    ]


def run_sweep(spec: TableSpec, seeds: list[int], launcher: str = "local", extra: Optional[list[str]] = None,
              results: Path = RESULTS_DIR, dry_run: bool = False, log=print) -> list[CellPlan]:
    """Launch every runnable cell's missing seeds (one Hydra multirun per cell), then return the plan."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose from {sorted(LAUNCHERS)}")
    cells = plan(spec, seeds, results)
    todo = [c for c in cells if c.missing and not c.no_data]
    log(f"{spec.name}: {len(cells)} cells, {sum(len(c.done) for c in cells)} runs done, "
        f"{sum(len(c.missing) for c in todo)} to run, {sum(1 for c in cells if c.no_data)} cells without data")
    for c in cells:
        if c.no_data:
            log(f"  {c.row.id} × {c.col.id}: {c.no_data}")
    failures = []
    for i, cell in enumerate(todo, 1):
        cmd = cell_command(spec, cell, launcher, list(extra or []))
        log(f"[{i}/{len(todo)}] {cell.row.id} × {cell.col.id}, seeds {cell.missing}")
        if dry_run:
            log("  " + shlex.join(cmd))
            continue
        cell.cell_dir.mkdir(parents=True, exist_ok=True)
        with open(cell.cell_dir / "sweep.log", "a") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            failures.append(cell)
            log(f"  failed (exit {proc.returncode}); see {cell.cell_dir / 'sweep.log'}")
    if failures:
        log(f"{len(failures)} cell(s) failed; the table is built from the runs that finished. Re-run to retry.")
    return plan(spec, seeds, results)


def run_analyses(spec: TableSpec, cells: list[CellPlan], seeds: list[int], log=print) -> None:
    """Probe / robustness / estimator analyses the spec needs, for finished runs that lack them."""
    from onthefly.analyse import analyse

    kinds = spec.analyses()
    if not kinds:
        return
    for cell in cells:
        for s in seeds:
            run_dir = cell.cell_dir / f"seed{s}"
            if not run_ok(run_dir):
                continue
            for kind in sorted(kinds):
                if not (run_dir / f"{kind}.json").exists():
                    log(f"  {kind}: {run_dir}")
                    analyse(kind, run_dir)
