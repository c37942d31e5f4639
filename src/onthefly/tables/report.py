"""`python -m onthefly.tables report NAME`: a W&B report (dashboard) for one table.

Per dataset (column): the ρ, k and q curves of every modality and the val-accuracy curve, each grouped by the
table's row (one line per method, mean over its seeds, band = min-max), over the runs of that dataset; then the
runs table of the whole table (its W&B group), and the published-vs-ours table as the last `tables build` wrote it.

The report is described once, as a plain specification (:func:`report_spec`: sections, panels, filters, groups),
and turned into a `wandb-workspaces` report from there (:func:`to_wandb_report`). Without a W&B login (or with
``--offline``, or when saving fails) the command writes the specification, with the payload W&B would receive,
to ``experiments/results/<NAME>/report.json`` and says what to run once online.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from onthefly.logging import names
from onthefly.tables.spec import TableSpec

# The logged metric names the report plots: the one place to change when the logged keys are renamed.
# {m} is a modality name. x: the x-axis metric of the panel ("Step": W&B's own step).
METRICS = {  # the logged names come from onthefly.logging.names (per-step train/*, per-epoch val/* against epoch)
    "rho": {"key": names.TRAIN + "rho_{m}", "x": "Step", "title": "ρ (discrepancy ratio), {m}"},
    "k": {"key": names.TRAIN + "k_{m}", "x": "Step", "title": "k (OGM gradient coefficient), {m}"},
    "q": {"key": names.TRAIN + "q_{m}", "x": "Step", "title": "q (OPM drop probability), {m}"},
    "val_acc": {"key": names.VAL + "acc", "x": names.EPOCH, "title": "val accuracy"},
}
# Table runs carry job_type = their table row (tables/sweep.py), so grouping by it gives one line per method.
GROUP_BY = "JobType"
DEFAULT_MODALITIES = ["audio", "visual"]


def column_modalities(spec: TableSpec, col) -> list[str]:
    """The modalities of a column's dataset, from its composed config (no data needed)."""
    from onthefly.config import compose

    try:
        return list(compose([f"experiment={col.preset}", *spec.overrides, *col.overrides]).dataset.modalities)
    except Exception:  # noqa: BLE001  (a column whose preset does not compose yet: the usual pair)
        return list(DEFAULT_MODALITIES)


def report_spec(
    spec: TableSpec, results: Path, project: str = "onthefly", entity: Optional[str] = None, modalities_of=None
) -> dict:
    """The report as plain data: title, the W&B group, one section per runnable column (filter: group + the
    column's tag; panels: metric keys, x-axis, group-by), the runs table's filter, and the published-vs-ours
    table in Markdown."""
    modalities_of = modalities_of or (lambda col: column_modalities(spec, col))
    sections = []
    for col in spec.columns:
        if col.pending:
            continue
        panels = []
        for kind in ("rho", "k", "q"):
            for m in modalities_of(col):
                metric = METRICS[kind]
                panels.append(
                    {
                        "kind": kind,
                        "title": metric["title"].format(m=m),
                        "x": metric["x"],
                        "y": [metric["key"].format(m=m)],
                        "groupby": GROUP_BY,
                    }
                )
        panels.append(
            {
                "kind": "val_acc",
                "title": METRICS["val_acc"]["title"],
                "x": METRICS["val_acc"]["x"],
                "y": [METRICS["val_acc"]["key"]],
                "groupby": GROUP_BY,
            }
        )
        sections.append(
            {
                "column": col.id,
                "label": col.label or col.id,
                "filter": {"group": spec.group, "tag": col.id},
                "panels": panels,
            }
        )
    table_md = results / spec.folder / "table.md"
    make_fidelity = "" if spec.fidelity == spec.default_fidelity else f" FIDELITY={spec.fidelity}"
    return {
        "title": spec.heading[:128],
        "description": f"Runs of `make reproduce-table-{spec.name}{make_fidelity}` (W&B group {spec.group}), by "
        "dataset and method.",
        "project": project,
        "entity": entity,
        "group": spec.group,
        "sections": sections,
        "runs_table": {"filter": {"group": spec.group}},
        "published_vs_ours": table_md.read_text()
        if table_md.exists()
        else f"(no table yet: run `make build-table-{spec.name}{make_fidelity}` and then this command again)",
        "metrics": METRICS,
    }


def _filters(flt: dict) -> str:
    """A runset filter in wandb-workspaces' expression language."""
    text = f"Metric('Group') == '{flt['group']}'"
    if flt.get("tag"):
        text += f" and Tags() in ['{flt['tag']}']"
    return text


def to_wandb_report(rspec: dict, entity: str):
    """The specification as a ``wandb_workspaces.reports.v2.Report`` (built offline; saving it needs a login)."""
    import wandb_workspaces.reports.v2 as wr

    blocks = [wr.P(rspec["description"])]
    for section in rspec["sections"]:
        runset = wr.Runset(
            entity=entity,
            project=rspec["project"],
            name=section["label"],
            filters=_filters(section["filter"]),
            groupby=[GROUP_BY],
        )
        panels = [
            wr.LinePlot(
                title=p["title"],
                x=p["x"],
                y=p["y"],
                groupby=p["groupby"],
                groupby_aggfunc="mean",
                groupby_rangefunc="minmax",
            )
            for p in section["panels"]
        ]
        blocks += [wr.H2(section["label"]), wr.PanelGrid(runsets=[runset], panels=panels)]
    blocks += [
        wr.H2("Runs"),
        wr.PanelGrid(
            runsets=[
                wr.Runset(
                    entity=entity,
                    project=rspec["project"],
                    name="all runs",
                    filters=_filters(rspec["runs_table"]["filter"]),
                )
            ]
        ),
    ]
    blocks += [wr.H2("Published vs ours"), wr.MarkdownBlock(text=rspec["published_vs_ours"])]
    return wr.Report(
        project=rspec["project"],
        entity=entity,
        title=rspec["title"],
        description=rspec["description"],
        blocks=blocks,
        width="fluid",
    )


def write_offline(rspec: dict, path: Path, why: str, name: str) -> Path:
    """Write the specification (and W&B's own payload for it, when wandb-workspaces can build it) to ``path``."""
    data = {"spec": rspec}
    try:
        model = to_wandb_report(rspec, rspec["entity"] or "")._to_model()
        data["wandb_viewspec"] = json.loads(model.spec.model_dump_json(by_alias=True, exclude_none=True))
    except Exception as err:  # noqa: BLE001  (the plain specification is still complete)
        data["wandb_viewspec_error"] = f"{type(err).__name__}: {err}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False))
    print(
        f"{why}: wrote the report's specification to {path}.\nOnce online (`wandb login`), run "
        f"`make report-table-{name}` (python -m onthefly.tables report {name}) to create the report in W&B; "
        "sync the offline runs first (`wandb sync <run>/wandb/offline-run-*`)."
    )
    return path


def make_report(
    spec: TableSpec, results: Path, project: str = "onthefly", entity: Optional[str] = None, offline: bool = False
) -> int:
    from onthefly.logging.sinks import wandb_logged_in

    rspec = report_spec(spec, results, project, entity)
    path = results / spec.folder / "report.json"
    if offline:
        write_offline(rspec, path, "offline (--offline)", spec.name)
        return 0
    if not wandb_logged_in():
        write_offline(rspec, path, "no W&B login", spec.name)
        return 0
    try:
        import wandb

        rspec["entity"] = entity or wandb.Api().default_entity
        report = to_wandb_report(rspec, rspec["entity"]).save()
    except Exception as err:  # noqa: BLE001  (no network, a refused key, ...: keep the specification)
        print(f"note: could not create the report in W&B ({type(err).__name__}: {err})", file=sys.stderr)
        write_offline(rspec, path, "W&B unreachable", spec.name)
        return 1
    print(f"report: {report.url}")
    return 0
