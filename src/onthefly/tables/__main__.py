"""`python -m onthefly.tables {list,run,build,report} …`: reproduce the paper's tables.

  list                                every table spec: rows, columns, seeds, data, job states, projected device-hours
  run NAME [--launcher serial]        launch the spec's missing jobs as one multirun (resumable), run its analyses,
                                      build the table; exits 1 while any job failed
  build NAME [--source local]         aggregate the finished runs (local folders, or --source wandb) into the table,
                                      and say which jobs failed, are still running or were never run
  report NAME                         a W&B report for the table (offline: its specification as JSON)

Every command takes --fidelity clean|official (default: the spec's own, its `fidelity` key): the protocol the
table's cells run under (docs/method.md §9). A fidelity other than clean keeps its runs and tables in
experiments/results/<NAME>/<fidelity>/ and its W&B runs in the group <NAME>-<fidelity>.

Launchers (conf/hydra/launcher/): serial (one job after another in one process), parallel (joblib, local
processes), local (submitit on this machine), slurm (submitit, one Slurm job array). Outputs go to
experiments/results/<NAME>/: table.md, table.tex, table.csv, summary.csv, records.csv, table.png, plots/*.png; the
table is also logged to W&B (group = NAME, job_type = table) unless --wandb disabled.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from onthefly.tables import aggregate, render, sweep
from onthefly.tables.spec import EXPERIMENTS_DIR, FIDELITIES, SpecError, load_spec, projected_hours, spec_path


def _seeds(text, spec):
    return [int(s) for s in text.split(",")] if text else list(spec.seeds)


def cmd_list(args) -> int:
    results = Path(args.results)
    root = sweep.data_root()
    status = 0
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        try:
            spec = load_spec(path, args.fidelity)
        except SpecError as err:
            print(f"{path.stem:<16} INVALID: {err}")
            status = 2
            continue
        cells = sweep.plan(spec, spec.seeds, results, root)
        jobs = sweep.all_jobs(cells)
        counts = {s: sum(j.state == s for j in jobs) for s in (sweep.DONE, sweep.FAILED, sweep.STARTED)}
        extra = ", ".join(f"{n} {s}" for s, n in counts.items() if s != sweep.DONE and n)
        data = sorted({c.col.id + ("" if not c.no_data else " (no data)") for c in cells})
        print(
            f"{spec.name:<16} {len(spec.rows)} rows × {len(spec.columns)} cols, seeds {spec.seeds}, "
            f"{counts[sweep.DONE]}/{len(jobs)} runs done{', ' + extra if extra else ''}  [{', '.join(data)}]"
        )
        print(f"{'':<16} {spec.heading}")
        hours = projected_hours(spec, args.throughput)
        known = {c: h for c, h in hours.items() if h is not None}
        if known:
            print(
                f"{'':<16} projected device-hours at {args.throughput:g} samples/s: "
                + ", ".join(f"{c} {h:.1f}" for c, h in known.items())
                + f" (total {sum(known.values()):.1f})"
            )
    return status


def status_lines(spec, cells, results: Path) -> list[str]:
    """What the table is still waiting for: failed jobs (cell, seed, error, log), started and never-run ones."""
    jobs = sweep.all_jobs(cells)
    lines = []
    failed = sweep.failure_lines(cells)
    if failed:
        lines += [
            (
                f"{len(failed)} failed job(s) (run again with --retry-failed once the cause is fixed; make: "
                "RETRY_FAILED=1):"
            ),
            *failed,
        ]
    started = [j for j in jobs if j.state == sweep.STARTED]
    if started:
        launch = sweep.last_launch(results, spec) or {}
        when = f" (last launch: {launch.get('launcher')}, {launch.get('started')})" if launch else ""
        lines.append(
            f"{len(started)} job(s) started, not finished: running, queued or stopped{when}: "
            + ", ".join(j.name for j in started[:10])
            + (" …" if len(started) > 10 else "")
        )
    todo = [j for j in jobs if j.state == sweep.TODO]
    if todo:
        make = f"make reproduce-table-{spec.name}{_make_fidelity(spec)}"
        lines.append(f"{len(todo)} job(s) never run: `{make}` runs them")
    no_data = [j for j in jobs if j.state == sweep.NO_DATA]
    if no_data:
        lines.append(f"{len(no_data)} job(s) wait for data (see the table's notes)")
    return lines


def build(
    spec,
    results: Path,
    seeds,
    source: str = "local",
    project: str = "onthefly",
    entity=None,
    wandb_mode: str = "offline",
    log=print,
    root=None,
) -> dict:
    cells = sweep.plan(spec, seeds, results, root)
    if source == "wandb":
        import wandb

        records = aggregate.wandb_records(spec, wandb.Api(), project, entity)
        jobs = None
    else:
        records = aggregate.local_records(spec, results, seeds)
        jobs = sweep.all_jobs(cells)
    summary = aggregate.summarise(spec, records, seeds=seeds, jobs=jobs, source=source)
    wide = render.wide_table(spec, summary)
    out = results / spec.folder
    out.mkdir(parents=True, exist_ok=True)
    markdown = render.to_markdown(wide)
    footer = _footer(spec, seeds, source)
    (out / "table.md").write_text(f"### {spec.heading}\n\n{markdown}\n\n{footer}\n")
    (out / "table.tex").write_text(render.to_latex(wide, spec.heading, spec.group) + "\n")
    wide.to_csv(out / "table.csv")
    summary.to_csv(out / "summary.csv", index=False)
    records.to_csv(out / "records.csv", index=False)
    pngs = [p for p in [render.table_png(spec, summary, out / "table.png")] if p]
    pngs += render.spec_plots(spec, records, out / "plots")
    log(f"\n### {spec.heading}\n\n{markdown}\n\n{footer}\n")
    if source == "local":
        for line in status_lines(spec, cells, results):
            log(line)
    log(
        f"written: {out}/table.md, table.tex, table.csv, summary.csv (n, seeds and reason per cell), records.csv"
        + (f", {len(pngs)} PNG(s)" if pngs else "")
    )
    if wandb_mode != "disabled":
        _log_table(spec, wide, pngs, project, entity, wandb_mode, out)
    return {"summary": summary, "wide": wide, "markdown": markdown, "pngs": pngs, "cells": cells}


def _make_fidelity(spec) -> str:
    """The make variable that selects the table's fidelity, where it is not the spec's default."""
    return "" if spec.fidelity == spec.default_fidelity else f" FIDELITY={spec.fidelity}"


def _selection(spec) -> str:
    """Where the rows' checkpoints were selected: val (clean), test (official, as the released code)."""
    chosen = {spec.row_fidelity(r) for r in spec.rows}
    if chosen == {"clean"}:
        return "checkpoint selected on val"
    if "clean" not in chosen:
        return "checkpoint selected on TEST, as the released code does (fidelity official)"
    return "checkpoint selected on val (clean rows) or on TEST (official rows)"


def _footer(spec, seeds, source) -> str:
    pub = f"; paper: {spec.published_source} {spec.published_table}" if spec.published_source else ""
    return (
        f"Protocol {spec.protocol or '—'}, fidelity {spec.fidelity_text}; mean ± std (population) over seeds "
        f"{','.join(map(str, seeds))} ((n=k): a cell with only k of them; [k]: see the notes); test split, "
        f"{_selection(spec)}; source: {source}{pub}. {spec.notes}".strip()
    )


def _log_table(spec, wide, pngs, project, entity, mode, out: Path) -> None:
    """The table and its figures as a W&B run of the table's group (job type `table`); the files are complete
    without it, so a W&B failure only warns."""
    from onthefly.logging.sinks import open_wandb_run

    os.environ.setdefault("WANDB_SILENT", "true")
    run, _ = open_wandb_run(
        out,
        {"table": spec.name, "fidelity": spec.fidelity_text},
        {
            "mode": mode,
            "project": project,
            "entity": entity,
            "group": spec.group,
            "job_type": "table",
            "name": f"table:{spec.group}",
        },
    )
    if run is None:
        return
    try:
        import wandb

        run.log(
            {
                "table": wandb.Table(dataframe=wide.reset_index()),
                **{f"plots/{p.stem}": wandb.Image(str(p)) for p in pngs},
            }
        )
        run.finish()
    except Exception as err:  # noqa: BLE001  (the files are written; W&B is a copy)
        print(f"note: could not log the table to W&B ({err}); the files in {out} are complete", file=sys.stderr)


def _launch_overrides(args) -> list[str]:
    extra = list(args.overrides)
    for option, key in (("partition", "partition"), ("account", "account")):
        value = getattr(args, option)
        if value:
            extra.append(f"hydra.launcher.{key}={value}")
    return extra


def cmd_run(args) -> int:
    os.environ.setdefault("WANDB_SILENT", "true")  # the analyses resume each run's W&B run: keep it quiet
    spec = load_spec(spec_path(args.name), args.fidelity)
    seeds = _seeds(args.seeds, spec)
    extra = _launch_overrides(args)
    results = Path(args.results)
    cells = sweep.run_sweep(
        spec, seeds, args.launcher, extra, results, dry_run=args.dry_run, retry_failed=args.retry_failed
    )
    if args.dry_run:
        return 0
    sweep.run_analyses(spec, cells, seeds)
    built = build(
        spec,
        results,
        seeds,
        wandb_mode=args.wandb,
        project=args.project,
        entity=args.entity,
        root=sweep.data_root(extra),
    )
    failed = [j for j in sweep.all_jobs(built["cells"]) if j.state == sweep.FAILED]
    if failed:
        print(
            f"error: {len(failed)} job(s) of {spec.name} failed (listed above); the table holds the others",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_build(args) -> int:
    spec = load_spec(spec_path(args.name), args.fidelity)
    build(spec, Path(args.results), _seeds(args.seeds, spec), args.source, args.project, args.entity, args.wandb)
    return 0


def cmd_report(args) -> int:
    from onthefly.tables import report

    spec = load_spec(spec_path(args.name), args.fidelity)
    return report.make_report(spec, Path(args.results), project=args.project, entity=args.entity, offline=args.offline)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onthefly.tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--results", default=str(sweep.RESULTS_DIR), help="results folder (default experiments/results)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    list_p = sub.add_parser("list", help="list the table specs, their status and projected device-hours")
    list_p.add_argument(
        "--throughput",
        type=float,
        default=1000.0,
        help="training samples/s of one device for the projection (measure with `make bench`)",
    )
    for name in ("run", "build", "report"):
        p = sub.add_parser(name)
        p.add_argument("name", help="table spec name (experiments/<name>.yaml)")
    for p in sub.choices.values():
        p.add_argument(
            "--fidelity",
            default=None,
            choices=list(FIDELITIES),
            help="clean (ours) | official (the released code's choices); default: the spec's own",
        )
        p.add_argument("--project", default="onthefly")
        p.add_argument("--entity", default=None)
    for name in ("run", "build"):
        p = sub.choices[name]
        p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the spec's)")
        p.add_argument(
            "--wandb",
            default="offline",
            choices=["offline", "online", "disabled"],
            help="where the table itself is logged",
        )
    run_p = sub.choices["run"]
    run_p.add_argument(
        "--launcher",
        default="serial",
        choices=sweep.LAUNCHERS,
        help="a preset of conf/hydra/launcher/ (default: serial)",
    )
    run_p.add_argument("--partition", default=None, help="Slurm partition (hydra.launcher.partition)")
    run_p.add_argument("--account", default=None, help="Slurm account (hydra.launcher.account)")
    run_p.add_argument("--retry-failed", action="store_true", help="run the failed jobs again too")
    run_p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the jobs, the launcher's settings and the one command, without running anything",
    )
    run_p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (hydra.launcher.* included)")
    sub.choices["build"].add_argument("--source", default="local", choices=["local", "wandb"])
    sub.choices["report"].add_argument(
        "--offline", action="store_true", help="only write the report's specification, even with a W&B login"
    )
    args, rest = parser.parse_known_args(argv)  # Hydra overrides may follow the options
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad or (rest and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(bad or rest)}")
    if args.command == "run":
        args.overrides = [*args.overrides, *rest]
    try:
        return {"list": cmd_list, "run": cmd_run, "build": cmd_build, "report": cmd_report}[args.command](args)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
