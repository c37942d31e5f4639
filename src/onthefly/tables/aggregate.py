"""Run records -> mean ± std per cell, with the published number and our delta beside it.

A *record* is one finished run as a flat dict: table, row, col, seed, and value keys such as `test/acc`,
`test/map`, `probe/acc_audio`, `robustness/acc_audio@0.5`, `estimator/agree`. Records come from local run
folders (results.json + probe.json / robustness.json / estimator.json) or from the W&B API (config + summary);
from there on both take the same path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from onthefly.resources import PUBLISHED_CSV
from onthefly.tables.spec import IMBALANCE_PREFIXES, TableSpec

ID_COLUMNS = ["table", "row", "col", "seed"]


# --- loading -----------------------------------------------------------------------------------------------
def record_from_run_dir(run_dir: Path) -> Optional[dict]:
    """The values of one local run folder, or None when it did not finish."""
    run_dir = Path(run_dir)
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if results.get("status") != "ok":
        return None
    rec = {f"test/{k}": v for k, v in (results.get("test") or {}).items()}
    rec.update({f"best/{k}": v for k, v in (results.get("best") or {}).items() if k in ("epoch", "score")})
    rec.update({k: v for k, v in (results.get("last") or {}).items() if k.startswith(("train/", "val/"))})
    rec.update({k: v for k, v in (results.get("imbalance") or {}).items() if isinstance(v, (int, float))})
    probe = run_dir / "probe.json"
    if probe.exists():
        rec.update({f"probe/acc_{m}": r["acc"] for m, r in json.loads(probe.read_text()).items()})
    robust = run_dir / "robustness.json"
    if robust.exists():
        data = json.loads(robust.read_text())
        for m, accs in data["acc"].items():
            rec.update({f"robustness/acc_{m}@{r}": a for r, a in zip(data["ratios"], accs)})
    est = run_dir / "estimator.json"
    if est.exists():
        rec.update({f"estimator/{k}": v for k, v in json.loads(est.read_text()).items()})
    rec["run_dir"] = str(run_dir)
    return rec


def local_records(spec: TableSpec, results: Path, seeds: Optional[Iterable[int]] = None) -> pd.DataFrame:
    rows = []
    for row, col in spec.run_cells():
        cell = results / spec.folder / "runs" / f"{row.id}__{col.id}"
        for s in seeds if seeds is not None else spec.seeds:
            rec = record_from_run_dir(cell / f"seed{s}")
            if rec is not None:
                rows.append({"table": spec.name, "row": row.id, "col": col.id, "seed": s, **rec})
    return pd.DataFrame(rows, columns=None if rows else ID_COLUMNS)


def wandb_records(spec: TableSpec, api, project: str, entity: Optional[str] = None) -> pd.DataFrame:
    """Records from W&B runs of the table's group (its name, ``<name>-<fidelity>`` beyond clean); row and column
    come from the run's tags.

    ``api`` is a ``wandb.Api()`` (or anything with the same ``runs(path, filters=...)`` method whose runs have
    ``.tags``, ``.config``, ``.summary`` and ``.state``).
    """
    path = f"{entity}/{project}" if entity else project
    row_ids, col_ids = {r.id for r in spec.rows}, {c.id for c in spec.columns}
    rows = []
    for run in api.runs(path, filters={"group": spec.group}):
        if getattr(run, "state", "finished") != "finished":
            continue
        tags = set(run.tags or [])
        row, col = tags & row_ids, tags & col_ids
        if len(row) != 1 or len(col) != 1:
            continue
        summary = dict(run.summary)
        values = {
            k: v
            for k, v in summary.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and k.split("/")[0]
            in ("test", "best", "probe", "robustness", "estimator", "val", "train", *IMBALANCE_PREFIXES)
        }
        rows.append(
            {
                "table": spec.name,
                "row": row.pop(),
                "col": col.pop(),
                "seed": run.config.get("seed"),
                **values,
                "run_dir": f"wandb:{path}/{run.id}",
            }
        )
    return pd.DataFrame(rows, columns=None if rows else ID_COLUMNS)


# --- published numbers -------------------------------------------------------------------------------------
def published_numbers(spec: TableSpec, csv: Path = PUBLISHED_CSV) -> dict:
    """{(row id, column id, value key): value in %} from published_results.csv.

    A row's ``published`` names fusion and method, and may set source, table and metric (default: the spec's
    source/table, and the metric of each `test/<metric>` key)."""
    if not Path(csv).exists():
        return {}
    df = pd.read_csv(csv)
    out = {}
    for row in spec.rows:
        pub = row.published or {}
        source, table = pub.get("source", spec.published_source), pub.get("table", spec.published_table)
        if not pub or not source:
            continue
        sel = df[
            (df["source"] == source)
            & (df["table"] == table)
            & (df["fusion"] == pub.get("fusion"))
            & (df["method"] == pub.get("method"))
        ]
        for col in spec.columns:
            hits = sel[sel["dataset"] == (col.published_dataset or col.id)]
            for key in spec.value_keys(row):
                metric = pub.get("metric") or (key.split("/", 1)[1] if key.startswith("test/") else None)
                match = hits[hits["metric"] == metric]
                if len(match):
                    out[(row.id, col.id, key)] = float(match["value"].iloc[0])
    return out


# --- summary -----------------------------------------------------------------------------------------------
def _short(error: Optional[str], limit: int = 160) -> str:
    line = (error or "").strip().splitlines()[0] if (error or "").strip() else "no error recorded"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def explain(missing: list[int], key: str, jobs: Optional[dict], source: str = "local") -> str:
    """Why the seeds ``missing`` give no ``key`` value, from their jobs' states (``jobs``: {seed: Job})."""
    from onthefly.tables import sweep

    reasons: dict[str, list] = {}  # reason -> the jobs (or seeds) it applies to
    for seed in missing:
        job = (jobs or {}).get(seed)
        if job is None:
            text = "no finished run" + (" in W&B" if source == "wandb" else "")
        elif job.state == sweep.NO_DATA:
            text = job.error
        elif job.state == sweep.FAILED:
            text = f"failed: {_short(job.error)}"
        elif job.state == sweep.STARTED:
            text = "started, not finished (running, queued or stopped)"
        elif job.state == sweep.TODO:
            text = "not run yet"
        else:
            kind = key.split("/")[0]
            text = f"finished without {key}" + (
                f" (the {kind} analysis has not run)" if kind in ("probe", "robustness", "estimator") else ""
            )
        reasons.setdefault(text, []).append(job if job is not None else seed)
    parts = []
    for text, items in reasons.items():
        seeds = [getattr(i, "seed", i) for i in items]
        if all(getattr(i, "state", None) == sweep.NO_DATA for i in items):
            parts.append(text)  # the same for every seed
            continue
        if all(getattr(i, "state", None) == sweep.FAILED for i in items):
            logs = [i.log_path if i.log_path.exists() else i.run_dir for i in items]
            where = (
                sweep.display_path(logs[0])
                if len(logs) == 1
                else (
                    sweep.display_path(items[0].run_dir.parent)
                    + "/seed{"
                    + ",".join(map(str, seeds))
                    + "}/"
                    + (logs[0].name if logs[0].name == "train.log" else "")
                )
            )
            text += f" (log: {where})"
        parts.append(f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))} {text}")
    return "; ".join(parts)


def summarise(
    spec: TableSpec,
    records: pd.DataFrame,
    published: Optional[dict] = None,
    seeds: Optional[Iterable[int]] = None,
    jobs: Optional[list] = None,
    source: str = "local",
) -> pd.DataFrame:
    """Long table: one line per (row, col, value key) with n (seeds with a value) of ``expected``, mean, std
    (population, ddof=0; values in %), the published number and ours minus it, the seeds used, and ``reason``:
    why seeds are missing (from ``jobs``, the sweep's :class:`~onthefly.tables.sweep.Job` list), None when none is."""
    published = published if published is not None else published_numbers(spec)
    seeds = list(seeds) if seeds is not None else list(spec.seeds)
    by_cell: dict = {}
    for job in jobs or []:
        by_cell.setdefault((job.row.id, job.col.id), {})[job.seed] = job
    if len(records) and "seed" in records:
        records = records[pd.to_numeric(records["seed"], errors="coerce").isin(seeds)]
    lines = []
    for row, col in spec.cells():
        src = row.same_runs_as or row.id
        sub = records[(records["row"] == src) & (records["col"] == col.id)] if len(records) else records
        for key in spec.value_keys(row):
            values = pd.to_numeric(sub[key], errors="coerce") if key in sub else pd.Series(dtype=float)
            vals = values.dropna() * (1 if key.startswith("cost/") else 100)  # counts stay counts
            have = sorted(int(s) for s in sub.loc[vals.index, "seed"]) if len(vals) else []
            missing = [s for s in seeds if s not in have]
            pub = published.get((row.id, col.id, key))
            mean = float(vals.mean()) if len(vals) else float("nan")
            lines.append(
                {
                    "row": row.id,
                    "col": col.id,
                    "key": key,
                    "n": int(len(vals)),
                    "expected": len(seeds),
                    "mean": mean,
                    "std": float(vals.std(ddof=0)) if len(vals) else float("nan"),
                    "published": pub,
                    "delta": mean - pub if pub is not None and len(vals) else None,
                    "seeds": ",".join(map(str, have)),
                    "reason": explain(missing, key, by_cell.get((src, col.id)), source) if missing else None,
                }
            )
    return pd.DataFrame(lines)
