"""Table reproduction: spec loading and validation, sweep planning, aggregation (local and W&B), rendering,
and the demo table end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from onthefly.tables import aggregate, render, sweep
from onthefly.tables.spec import EXPERIMENTS_DIR, SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]

BASE_SPEC = """
name: {name}
title: a test table
seeds: [0, 1, 2]
values: [test/acc]
published: {{source: cvpr2022_ogm_ge, table: table2}}
columns:
  cremad: {{preset: demo, label: CREMA-D}}
  kinetics_sounds: {{preset: demo, data: kinetics_sounds, prep: make prep-kinetics-sounds RAW=x}}
rows:
  concat: {{overrides: [modulation=none], published: {{fusion: concat, method: none}}}}
  ogm_ge: {{overrides: [modulation=ogm_ge], published: {{fusion: concat, method: ogm_ge}}}}
  probe_row: {{same_runs_as: concat, values: [probe/acc_audio]}}
"""


def write_spec(tmp_path: Path, text: str, name: str = "t") -> Path:
    """Write a spec template (doubled braces, `{name}` slot) as <tmp>/<name>.yaml."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.format(name=name))
    return path


def write_run(run_dir: Path, acc: float, status: str = "ok", probe: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps({"status": status, "test": {"acc": acc, "map": acc / 2},
                                                      "best": {"epoch": 3, "score": acc}}))
    if probe:
        (run_dir / "probe.json").write_text(json.dumps({m: {"acc": a, "val_acc": a, "l2": 0.01} for m, a in probe.items()}))


# --- spec loading --------------------------------------------------------------------------------------------
def test_every_spec_in_experiments_loads():
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    assert {"cvpr-t1", "cvpr-t2", "cvpr-t6", "cvpr-t7", "journal-main", "fusion", "probe", "robustness", "noise",
            "estimator", "demo"} <= set(names)
    for name in names:
        spec = load_spec(EXPERIMENTS_DIR / f"{name}.yaml")
        assert spec.rows and spec.columns


def test_spec_with_unknown_preset_is_rejected(tmp_path):
    path = write_spec(tmp_path, BASE_SPEC.replace("preset: demo, label", "preset: cvpr2022/nope, label"))
    with pytest.raises(SpecError, match=r"unknown experiment preset 'cvpr2022/nope'"):
        load_spec(path)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("values: [test/acc]", "values: [test/acc]\nbogus: 1", "unknown key"),
        ("[modulation=none]", "[modulation=nope]", "unknown modulation option 'nope'"),
        ("[probe/acc_audio]", "[probe/accuracy]", "value key"),
        ("same_runs_as: concat", "same_runs_as: ghost", "same_runs_as"),
        ("name: {name}", "name: other", "must match the file name"),
    ],
)
def test_spec_errors_name_the_problem(tmp_path, old, new, message):
    path = write_spec(tmp_path, BASE_SPEC.replace(old, new))
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_pending_column_needs_no_preset_and_reports_why(tmp_path):
    text = BASE_SPEC.replace("kinetics_sounds: {{preset: demo,", "kinetics_sounds: {{preset: tpami2024/none, pending: reader missing,")
    spec = load_spec(write_spec(tmp_path, text))
    cells = sweep.plan(spec, [0], tmp_path / "results", root=tmp_path)
    ks = [c for c in cells if c.col.id == "kinetics_sounds"]
    assert ks and all(c.no_data == "not available yet: reader missing" for c in ks)


# --- sweep planning ------------------------------------------------------------------------------------------
def test_plan_skips_finished_seeds_and_reports_missing_data(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    results = tmp_path / "results"
    write_run(results / "t" / "runs" / "concat__cremad" / "seed0", 0.5)
    write_run(results / "t" / "runs" / "concat__cremad" / "seed1", 0.5, status="failed")
    cells = {(c.row.id, c.col.id): c for c in sweep.plan(spec, [0, 1, 2], results, root=tmp_path / "data")}
    assert ("probe_row", "cremad") not in cells  # reads the concat runs, runs nothing itself
    assert cells[("concat", "cremad")].done == [0] and cells[("concat", "cremad")].missing == [1, 2]
    assert cells[("ogm_ge", "cremad")].no_data is None
    assert "make prep-kinetics-sounds RAW=x" in cells[("concat", "kinetics_sounds")].no_data
    (tmp_path / "data" / "kinetics_sounds").mkdir(parents=True)
    cells = {(c.row.id, c.col.id): c for c in sweep.plan(spec, [0], results, root=tmp_path / "data")}
    assert cells[("concat", "kinetics_sounds")].no_data is None


def test_cell_command_is_one_hydra_multirun_per_cell(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    cell = sweep.plan(spec, [0, 2], tmp_path / "r", root=tmp_path)[0]
    cmd = sweep.cell_command(spec, cell, "slurm", ["hydra.launcher.partition=gpu"])
    assert cmd[1:4] == ["-m", "onthefly.train", "-m"]
    assert "experiment=demo" in cmd and "modulation=none" in cmd and "seed=0,2" in cmd
    assert "logger.group=t" in cmd and "logger.tags=[concat,cremad]" in cmd
    assert "hydra/launcher=submitit_slurm" in cmd and cmd[-1] == "hydra.launcher.partition=gpu"
    assert f"hydra.sweep.dir={tmp_path / 'r' / 't' / 'runs' / 'concat__cremad'}" in cmd


def test_unknown_launcher_is_refused(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    with pytest.raises(ValueError, match="unknown launcher"):
        sweep.run_sweep(spec, [0], "kubernetes", results=tmp_path, log=lambda *_: None)


# --- aggregation ------------------------------------------------------------------------------------------------
def test_local_aggregation_means_stds_published_and_delta(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    results = tmp_path / "results"
    runs = results / "t" / "runs"
    for seed, acc, probe in [(0, 0.50, 0.40), (1, 0.60, 0.50), (2, 0.70, 0.60)]:
        write_run(runs / "concat__cremad" / f"seed{seed}", acc, probe={"audio": probe})
    write_run(runs / "ogm_ge__cremad" / "seed0", 0.80)
    write_run(runs / "ogm_ge__cremad" / "seed1", 0.10, status="failed")  # ignored
    records = aggregate.local_records(spec, results)
    assert len(records) == 4
    summary = aggregate.summarise(spec, records).set_index(["row", "col", "key"])
    concat = summary.loc[("concat", "cremad", "test/acc")]
    assert concat["n"] == 3
    assert concat["mean"] == pytest.approx(60.0)
    assert concat["std"] == pytest.approx((200 / 3) ** 0.5)  # population std of 50, 60, 70
    assert concat["published"] == pytest.approx(51.7)  # CVPR Table 2, CREMA-D, concat
    assert concat["delta"] == pytest.approx(60.0 - 51.7)
    ogm = summary.loc[("ogm_ge", "cremad", "test/acc")]
    assert (ogm["n"], ogm["mean"], ogm["std"]) == (1, pytest.approx(80.0), 0.0)
    assert ogm["published"] == pytest.approx(61.9)
    probe = summary.loc[("probe_row", "cremad", "probe/acc_audio")]
    assert probe["n"] == 3 and probe["mean"] == pytest.approx(50.0)
    empty = summary.loc[("concat", "kinetics_sounds", "test/acc")]
    assert empty["n"] == 0 and empty["published"] == pytest.approx(59.8)


def test_wide_table_fills_every_cell_with_a_value_or_a_reason(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    results = tmp_path / "results"
    for seed in (0, 1):
        write_run(results / "t" / "runs" / "concat__cremad" / f"seed{seed}", 0.5 + 0.1 * seed, probe={"audio": 0.3})
    summary = aggregate.summarise(spec, aggregate.local_records(spec, results))
    wide = render.wide_table(spec, summary, {("concat", "kinetics_sounds"): "no data: run make prep-kinetics-sounds"})
    assert wide.loc["concat", "CREMA-D acc"] == "55.0 ± 5.0"
    assert wide.loc["concat", "CREMA-D acc (paper)"] == "51.7"
    assert wide.loc["concat", "CREMA-D acc Δ"] == "+3.3"
    assert wide.loc["ogm_ge", "CREMA-D acc"] == "–"  # no finished run
    assert wide.loc["concat", "kinetics_sounds acc"] == "no data: run make prep-kinetics-sounds"
    assert wide.loc["probe_row", "kinetics_sounds acc"] == "n/a"  # the row has no such key
    markdown = render.to_markdown(wide)
    assert markdown.splitlines()[0].startswith("| row | CREMA-D acc |")
    latex = render.to_latex(wide, "cap", "t")
    assert r"55.0 $\pm$ 5.0" in latex and r"\begin{tabular}" in latex


class FakeRun:
    """Stands in for a record of wandb.Api().runs(): the attributes the W&B loader reads (tags, config,
    summary, state, id). Not the W&B API itself: no network here."""

    def __init__(self, run_id, row, col, seed, acc, state="finished"):
        self.id, self.tags, self.state = run_id, [row, col, "extra"], state
        self.config = {"seed": seed, "logger": {"group": "t"}}
        self.summary = {"test/acc": acc, "test/map": acc / 2, "_runtime": 12.0, "best/split": "val"}


class FakeApi:
    """Stands in for wandb.Api(): records the path and filters it was asked for."""

    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [r for r in self._runs if (filters or {}).get("group") == "t"]


def test_wandb_records_take_the_same_path_as_local(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    api = FakeApi([FakeRun("a", "concat", "cremad", 0, 0.5), FakeRun("b", "concat", "cremad", 1, 0.7),
                   FakeRun("c", "ogm_ge", "cremad", 0, 0.9, state="running"),  # unfinished: left out
                   FakeRun("d", "unknown_row", "cremad", 0, 0.1)])  # not a row of this spec
    records = aggregate.wandb_records(spec, api, project="onthefly", entity="lab")
    assert api.calls == [("lab/onthefly", {"group": "t"})]
    assert sorted(records["seed"]) == [0, 1] and set(records["row"]) == {"concat"}
    assert "_runtime" not in records and "best/split" not in records
    summary = aggregate.summarise(spec, records).set_index(["row", "col", "key"])
    assert summary.loc[("concat", "cremad", "test/acc"), "mean"] == pytest.approx(60.0)
    # local runs with the same values give the same summary
    for seed, acc in [(0, 0.5), (1, 0.7)]:
        write_run(tmp_path / "res" / "t" / "runs" / "concat__cremad" / f"seed{seed}", acc)
    local = aggregate.summarise(spec, aggregate.local_records(spec, tmp_path / "res")).set_index(["row", "col", "key"])
    assert local.loc[("concat", "cremad", "test/acc"), ["n", "mean", "std"]].tolist() == \
        summary.loc[("concat", "cremad", "test/acc"), ["n", "mean", "std"]].tolist()


def test_published_numbers_follow_the_rows_table_and_metric(tmp_path):
    text = BASE_SPEC.replace("probe_row: {{same_runs_as: concat, values: [probe/acc_audio]}}",
                             "probe_row: {{same_runs_as: concat, values: [probe/acc_audio], "
                             "published: {{table: table1, fusion: audio_only, method: none, metric: acc}}}}")
    spec = load_spec(write_spec(tmp_path, text))
    pub = aggregate.published_numbers(spec)
    assert pub[("probe_row", "cremad", "probe/acc_audio")] == pytest.approx(52.5)  # CVPR Table 1 audio probe
    assert pub[("ogm_ge", "kinetics_sounds", "test/acc")] == pytest.approx(62.3)
    assert ("ogm_ge", "cremad", "test/map") not in pub


def test_published_csv_is_well_formed():
    """The published numbers ship with the repository: one number per (source, table, dataset, fusion, method,
    metric), every value a percentage."""
    pub = pd.read_csv(aggregate.PUBLISHED_CSV)
    assert list(pub.columns) == ["source", "table", "dataset", "fusion", "method", "metric", "value"]
    assert not pub.duplicated(["source", "table", "dataset", "fusion", "method", "metric"]).any()
    assert pub["value"].between(0, 100).all() and pub.notna().all().all()
    assert {"cvpr2022_ogm_ge", "balancebenchmark_2025"} <= set(pub["source"])


# --- end to end ------------------------------------------------------------------------------------------------
TINY_TABLE = ["trainer.epochs=1", "dataset.num_train=48", "dataset.num_val=24", "dataset.num_test=24",
              "trainer.batch_size=16", "trainer.eval_batch_size=24", "logger.mode=disabled"]


@pytest.mark.slow
def test_reproduce_table_demo_end_to_end(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "onthefly.tables", "--results", str(results), "run", "demo", "--seeds", "0",
           "--wandb", "disabled", *TINY_TABLE]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = results / "demo"
    table = (out / "table.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| row")]
    assert len(lines) == 6  # one per demo row
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert cells and all(c not in ("", "–", "nan") for c in cells), line
    assert (out / "table.tex").exists() and (out / "table.png").exists()
    assert list((out / "plots").glob("*_rho.png")) and list((out / "plots").glob("*_probe.png"))
    # resumable: a second run finds every run done and launches nothing
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 to run" in again.stdout


def test_projected_hours_is_runs_times_epochs_times_clips_over_throughput(tmp_path):
    text = BASE_SPEC.replace("cremad: {{preset: demo,", "cremad: {{preset: demo, train_clips: 3600,")
    spec = load_spec(write_spec(tmp_path, text))
    hours = __import__("onthefly.tables.spec", fromlist=["projected_hours"]).projected_hours(
        spec, samples_per_s=100.0, epochs_of=lambda col: 10)
    # 2 rows own runs (probe_row reads concat's) x 3 seeds = 6 runs; 6 x 10 epochs x 3600 clips / 100 per s = 2160 s
    assert hours["cremad"] == pytest.approx(0.6)
    assert hours["kinetics_sounds"] is None  # no train_clips given


@pytest.mark.slow
def test_every_cell_of_every_spec_composes():
    """Each distinct cell configuration (preset + spec/column/row overrides + the column's settings for the row's
    method) composes: catches what the loader cannot see, such as a preset key that clashes with a row's optimizer
    or a method override naming a key the method does not have."""
    from onthefly.config import compose
    from onthefly.tables.spec import all_specs

    # fusion heads compose with anything (the loader checks the option exists): one representative per rest
    cells = {tuple(o for o in spec.cell_overrides(r, c) if not o.startswith("fusion="))
             for spec in all_specs() for r, c in spec.run_cells() if not c.pending}
    assert len(cells) > 40
    failures = []
    for overrides in sorted(cells):
        try:
            compose(list(overrides))
        except Exception as err:  # noqa: BLE001  (collect them all, then report)
            failures.append(f"{' '.join(overrides)}: {str(err).splitlines()[0]}")
    assert not failures, "\n".join(failures)


def test_method_overrides_apply_only_to_their_method(tmp_path):
    text = BASE_SPEC.replace("cremad: {{preset: demo,", "cremad: {{preset: demo, method_overrides: {{ogm_ge: [modulation.alpha=2.6]}},")
    spec = load_spec(write_spec(tmp_path, text))
    rows = {r.id: r for r in spec.rows}
    col = spec.columns[0]
    assert spec.cell_overrides(rows["ogm_ge"], col)[-1] == "modulation.alpha=2.6"
    assert "modulation.alpha=2.6" not in spec.cell_overrides(rows["concat"], col)
    bad = BASE_SPEC.replace("cremad: {{preset: demo,", "cremad: {{preset: demo, method_overrides: {{ogm_gee: [x=1]}},")
    with pytest.raises(SpecError, match="unknown modulation option 'ogm_gee'"):
        load_spec(write_spec(tmp_path, bad, name="t2"))
