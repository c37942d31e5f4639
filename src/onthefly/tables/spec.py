"""Table specs: one YAML file per paper table in `experiments/`.

A spec names its rows (methods, fusions or models, each a list of Hydra overrides), its columns (datasets, each
an experiment preset and the data it needs), the seeds, the metrics shown per column, and where the published
numbers come from. Every cell is one training configuration; a cell's value is read from each seed's run record
(see `aggregate.py` for the keys: `test/acc`, `probe/acc_audio`, `robustness/acc_audio@0.5`, ...).

Each spec runs under a fidelity (``clean``: our protocol; ``official``: the released code's choices,
conf/fidelity/, docs/method.md §9): the spec's own default (its ``fidelity`` key, clean if absent), or the one
``--fidelity`` asks for; a row may pin its own (``fidelity`` in the row: the fidelity-ablation table). Every cell
gets ``fidelity=<its fidelity>``; a fidelity other than clean keeps its runs and tables in a sub-folder of the
spec's results (``<results>/<name>/official/``) and its W&B runs in their own group (``<name>-official``).

Loading checks everything that can be checked without running: known keys only, every experiment preset and
every group option named by an override exists in conf/, every value key is well formed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from onthefly.config import CONF_DIR
from onthefly.resources import EXPERIMENTS_DIR

FIDELITIES = tuple(sorted(p.stem for p in (CONF_DIR / "fidelity").glob("*.yaml")))  # clean, official
_GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
_VALUE_KEY = re.compile(
    r"^(test|val|best)/[a-z0-9_]+$|^probe/acc_[a-z0-9_]+$|^robustness/acc_[a-z0-9_]+@[01](\.\d+)?$"
    r"|^estimator/[a-z0-9_]+$|^train/[a-z0-9_]+$"
    r"|^(shapley|shapley_share|shapley_sample|cur|cost)/[a-z0-9_]+$"
)
# imbalance and cost keys of results.json (engine/imbalance.py); cost/* are counts, not fractions
IMBALANCE_PREFIXES = ("shapley", "shapley_share", "shapley_sample", "cur", "cost")


class SpecError(ValueError):
    """A table spec that cannot be run; the message names the file and the fix."""


@dataclass
class Column:
    id: str
    preset: str  # experiment preset: conf/experiment/<preset>.yaml
    data: Optional[str] = None  # dataset folder under paths.data_root (None: built in, always available)
    prep: Optional[str] = None  # the command that makes that data
    label: Optional[str] = None
    published_dataset: Optional[str] = None  # dataset name in published_results.csv (default: id)
    overrides: list[str] = field(default_factory=list)
    pending: Optional[str] = None  # why this column cannot run yet (e.g. its dataset reader is not built)
    train_clips: Optional[int] = None  # size of the training split (published), for run-time projections
    method_overrides: dict = field(default_factory=dict)  # {modulation option: [overrides]} (e.g. alpha per dataset)
    row_overrides: dict = field(default_factory=dict)  # {row id: [overrides]}: what a row sets in this column only


@dataclass
class Row:
    id: str
    overrides: list[str]
    label: Optional[str] = None
    values: Optional[list[str]] = None  # value keys when they differ from the spec's (e.g. a probe)
    published: Optional[dict] = None  # {fusion, method[, metric, table, source]} selecting published_results.csv
    analyses: list[str] = field(default_factory=list)
    same_runs_as: Optional[str] = None  # read the runs of that row (same configuration) instead of running
    fidelity: Optional[str] = None  # this row's own fidelity, whatever the table's (None: the table's)


@dataclass
class TableSpec:
    name: str
    title: str
    path: Path
    columns: list[Column]
    rows: list[Row]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    values: list[str] = field(default_factory=lambda: ["test/acc"])  # value keys per column
    protocol: str = ""
    published_source: Optional[str] = None
    published_table: Optional[str] = None
    overrides: list[str] = field(default_factory=list)  # for every cell
    plots: list[str] = field(default_factory=list)  # rho, k, q, acc_curves, robustness, probe
    notes: str = ""
    default_fidelity: str = "clean"  # the spec's `fidelity` key
    fidelity: str = "clean"  # the fidelity this table runs under (default_fidelity unless asked otherwise)

    @property
    def folder(self) -> str:
        """The table's folder under the results root: ``<name>`` for clean, ``<name>/<fidelity>`` otherwise."""
        return self.name if self.fidelity == "clean" else f"{self.name}/{self.fidelity}"

    @property
    def group(self) -> str:
        """The W&B group of the table's runs: ``<name>`` for clean, ``<name>-<fidelity>`` otherwise."""
        return self.name if self.fidelity == "clean" else f"{self.name}-{self.fidelity}"

    @property
    def fidelity_text(self) -> str:
        """The fidelity as a table header says it (rows that pin their own are named)."""
        pinned = [r for r in self.rows if r.fidelity and r.fidelity != self.fidelity]
        if not pinned:
            return self.fidelity
        return f"{self.fidelity}; " + ", ".join(f"row {r.id}: {r.fidelity}" for r in pinned)

    @property
    def heading(self) -> str:
        return f"{self.title} [fidelity: {self.fidelity_text}]"

    def row_fidelity(self, row: Row) -> str:
        return row.fidelity or self.fidelity

    def data_folder(self, row: Row, col: Column) -> Optional[str]:
        """The data folder a cell needs: the column's, or under fidelity=official the folder the official dataset
        options name (conf/fidelity/dataset/official_<data>.yaml: ``cremad_official``, ...)."""
        roots = [o.split("=", 1)[1] for o in self.cell_overrides(row, col) if o.startswith("dataset.root=")]
        if roots:  # a cell that reads another cache (the fidelity-ablation's prep row)
            return roots[-1].rstrip("/").rsplit("/", 1)[-1]
        if not col.data or self.row_fidelity(row) == "clean":
            return col.data
        return official_data_folder(col.data)

    def cells(self):
        """(row, column) pairs in display order."""
        return [(r, c) for r in self.rows for c in self.columns]

    def run_cells(self):
        """The cells that own runs (rows reading another row's runs are left out)."""
        return [(r, c) for r, c in self.cells() if not r.same_runs_as]

    def value_keys(self, row: Row) -> list[str]:
        return list(row.values) if row.values else list(self.values)

    def all_value_keys(self) -> list[str]:
        keys = list(self.values)
        for row in self.rows:
            keys += [k for k in self.value_keys(row) if k not in keys]
        return keys

    def cell_overrides(self, row: Row, col: Column) -> list[str]:
        """The cell's Hydra overrides: preset, spec, column, row, then the column's settings for the row's method."""
        overrides = [*self.overrides, *col.overrides, *row.overrides]
        methods = [o.split("=", 1)[1] for o in overrides if o.startswith("modulation=")]
        method = methods[-1] if methods else "none"
        return [
            f"experiment={col.preset}",
            f"fidelity={self.row_fidelity(row)}",
            *overrides,
            *col.method_overrides.get(method, []),
            *col.row_overrides.get(row.id, []),
        ]

    def analyses(self) -> set[str]:
        """Post-training analyses the rows need (probe, robustness, estimator)."""
        needed = set()
        for row in self.rows:
            needed.update(row.analyses)
            for key in self.value_keys(row) + [
                k for r in self.rows if r.same_runs_as == row.id for k in self.value_keys(r)
            ]:
                if key.split("/")[0] in ("probe", "robustness", "estimator"):
                    needed.add(key.split("/")[0])
        return needed


_SPEC_KEYS = {
    "name",
    "title",
    "columns",
    "rows",
    "seeds",
    "values",
    "protocol",
    "published",
    "overrides",
    "plots",
    "notes",
    "fidelity",
}
_COL_KEYS = {
    "preset",
    "data",
    "prep",
    "label",
    "published_dataset",
    "overrides",
    "pending",
    "train_clips",
    "method_overrides",
    "row_overrides",
}
_ROW_KEYS = {"overrides", "label", "values", "published", "analyses", "same_runs_as", "fidelity"}
_PLOTS = {"rho", "k", "q", "acc_curves", "robustness", "probe"}


def _check_keys(where: str, got: dict, allowed: set) -> None:
    unknown = set(got) - allowed
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _check_override(where: str, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep:
        raise SpecError(f"{where}: override {override!r} is not key=value")
    key = key.lstrip("+~")
    if key in ("fidelity", "table_cell"):
        raise SpecError(
            f"{where}: override {override!r}: a table sets {key} itself (the spec's or a row's "
            "`fidelity:` key; --fidelity)"
        )
    if key in _GROUPS and key != "experiment":
        if not (CONF_DIR / key / f"{value}.yaml").exists():
            options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            raise SpecError(f"{where}: unknown {key} option {value!r}; conf/{key}/ has {options}")


def _check_preset(where: str, preset: str) -> None:
    if not (CONF_DIR / "experiment" / f"{preset}.yaml").exists():
        raise SpecError(
            f"{where}: unknown experiment preset {preset!r} (no conf/experiment/{preset}.yaml); "
            "add the preset or fix the name"
        )


def _check_value_key(where: str, key: str) -> None:
    if not _VALUE_KEY.match(key):
        raise SpecError(
            f"{where}: value key {key!r} is not one of test/…, val/…, best/…, probe/acc_<m>, "
            "robustness/acc_<m>@<r>, estimator/…, shapley/<m>, shapley_share/<m>, shapley_sample/<m>, "
            "cur/…, cost/…"
        )


def official_data_folder(data: str) -> str:
    """The folder fidelity=official reads a dataset from: the last part of the ``dataset.root`` that
    conf/fidelity/dataset/official_<data>.yaml sets, or ``data`` where that file sets none."""
    path = CONF_DIR / "fidelity" / "dataset" / f"official_{data}.yaml"
    if not path.exists():
        return data
    root = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("dataset", {}).get("root")
    return str(root).rstrip("/").rsplit("/", 1)[-1] if root else data


def _check_fidelity(where: str, value) -> str:
    if value not in FIDELITIES:
        raise SpecError(f"{where}: fidelity {value!r} is not one of {list(FIDELITIES)} (conf/fidelity/)")
    return value


def load_spec(path: Path | str, fidelity: Optional[str] = None) -> TableSpec:
    """The spec at ``path``, to run under ``fidelity`` (None: the spec's own default)."""
    path = Path(path)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    where = str(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a table spec is a mapping")
    _check_keys(where, raw, _SPEC_KEYS)
    for required in ("name", "title", "columns", "rows"):
        if required not in raw:
            raise SpecError(f"{where}: missing required key {required!r}")
    if raw["name"] != path.stem:
        raise SpecError(f"{where}: name {raw['name']!r} must match the file name {path.stem!r}")
    columns = []
    for cid, c in raw["columns"].items():
        _check_keys(f"{where} column {cid}", c, _COL_KEYS)
        if "preset" not in c:
            raise SpecError(f"{where} column {cid}: missing 'preset'")
        if not c.get("pending"):
            _check_preset(f"{where} column {cid}", c["preset"])
        for o in c.get("overrides", []):
            _check_override(f"{where} column {cid}", o)
        for method, extra in (c.get("method_overrides") or {}).items():
            _check_override(f"{where} column {cid} method_overrides", f"modulation={method}")
            for o in extra:
                _check_override(f"{where} column {cid} method_overrides.{method}", o)
        columns.append(Column(id=cid, **c))
    rows = []
    for rid, r in raw["rows"].items():
        _check_keys(f"{where} row {rid}", r, _ROW_KEYS)
        for o in r.get("overrides", []):
            _check_override(f"{where} row {rid}", o)
        for key in r.get("values", []):
            _check_value_key(f"{where} row {rid}", key)
        bad = set(r.get("analyses", [])) - {"probe", "robustness", "estimator"}
        if bad:
            raise SpecError(f"{where} row {rid}: unknown analyses {sorted(bad)}")
        if "fidelity" in r:
            _check_fidelity(f"{where} row {rid}", r["fidelity"])
        rows.append(
            Row(
                id=rid,
                overrides=list(r.get("overrides", [])),
                label=r.get("label"),
                values=r.get("values"),
                published=r.get("published"),
                analyses=list(r.get("analyses", [])),
                same_runs_as=r.get("same_runs_as"),
                fidelity=r.get("fidelity"),
            )
        )
    ids = {r.id for r in rows}
    for col in columns:
        for rid, extra in col.row_overrides.items():
            if rid not in ids:
                raise SpecError(f"{where} column {col.id} row_overrides: {rid!r} is not a row of the spec")
            for o in extra:
                _check_override(f"{where} column {col.id} row_overrides.{rid}", o)
    for r in rows:
        if r.same_runs_as and (r.same_runs_as not in ids or r.same_runs_as == r.id):
            raise SpecError(f"{where} row {r.id}: same_runs_as names {r.same_runs_as!r}, not another row")
    for key in raw.get("values", []):
        _check_value_key(where, key)
    bad = set(raw.get("plots", [])) - _PLOTS
    if bad:
        raise SpecError(f"{where}: unknown plots {sorted(bad)}; choose from {sorted(_PLOTS)}")
    for o in raw.get("overrides", []):
        _check_override(where, o)
    published = raw.get("published") or {}
    default = _check_fidelity(where, raw.get("fidelity", "clean"))
    if fidelity is not None:
        _check_fidelity("--fidelity", fidelity)
    return TableSpec(
        name=raw["name"],
        title=raw["title"],
        path=path,
        columns=columns,
        rows=rows,
        seeds=list(raw.get("seeds", [0, 1, 2])),
        values=list(raw.get("values", ["test/acc"])),
        protocol=raw.get("protocol", ""),
        published_source=published.get("source"),
        published_table=published.get("table"),
        overrides=list(raw.get("overrides", [])),
        plots=list(raw.get("plots", [])),
        notes=raw.get("notes", ""),
        default_fidelity=default,
        fidelity=fidelity or default,
    )


def projected_hours(spec: TableSpec, samples_per_s: float, epochs_of=None) -> dict[str, Optional[float]]:
    """Device-hours per column to train every run of the spec: runs × epochs × train clips / throughput.

    A projection, not a measurement: ``samples_per_s`` is the training throughput of one device (measure it with
    `make bench` on the target GPU). ``epochs_of(column)`` gives a column's epochs (default: compose its preset).
    None where the column has no ``train_clips``."""
    epochs_of = epochs_of or _preset_epochs
    out = {}
    for col in spec.columns:
        runs = len(spec.run_cells()) // max(len(spec.columns), 1) * len(spec.seeds)
        if col.train_clips is None or col.pending:
            out[col.id] = None
            continue
        out[col.id] = runs * epochs_of(col) * col.train_clips / samples_per_s / 3600
    return out


def _preset_epochs(col: Column) -> int:
    from onthefly.config import compose

    return int(compose([f"experiment={col.preset}", *col.overrides]).trainer.epochs)


def spec_path(name: str) -> Path:
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
        raise SpecError(f"no table spec {name!r} in experiments/; known: {known}")
    return path


def all_specs(fidelity: Optional[str] = None) -> list[TableSpec]:
    return [load_spec(p, fidelity) for p in sorted(EXPERIMENTS_DIR.glob("*.yaml"))]
