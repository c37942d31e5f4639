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
    (run_dir / "results.json").write_text(
        json.dumps({"status": status, "test": {"acc": acc, "map": acc / 2}, "best": {"epoch": 3, "score": acc}})
    )
    if probe:
        (run_dir / "probe.json").write_text(
            json.dumps({m: {"acc": a, "val_acc": a, "l2": 0.01} for m, a in probe.items()})
        )


# --- spec loading --------------------------------------------------------------------------------------------
def test_every_spec_in_experiments_loads():
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    assert {
        "cvpr-t1",
        "cvpr-t2",
        "cvpr-t6",
        "cvpr-t7",
        "journal-main",
        "fusion",
        "probe",
        "robustness",
        "noise",
        "estimator",
        "demo",
    } <= set(names)
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
    text = BASE_SPEC.replace(
        "kinetics_sounds: {{preset: demo,", "kinetics_sounds: {{preset: tpami2024/none, pending: reader missing,"
    )
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
    concat = cells[("concat", "cremad")]
    assert concat.done == [0] and concat.missing == [1, 2]
    assert [j.state for j in concat.jobs] == [sweep.DONE, sweep.FAILED, sweep.TODO]
    assert cells[("ogm_ge", "cremad")].no_data is None
    assert "make prep-kinetics-sounds RAW=x" in cells[("concat", "kinetics_sounds")].no_data
    assert all(j.state == sweep.NO_DATA for j in cells[("concat", "kinetics_sounds")].jobs)
    (tmp_path / "data" / "kinetics_sounds").mkdir(parents=True)
    cells = {(c.row.id, c.col.id): c for c in sweep.plan(spec, [0], results, root=tmp_path / "data")}
    assert cells[("concat", "kinetics_sounds")].no_data is None


def test_job_state_is_read_from_the_folder(tmp_path):
    assert sweep.job_state(tmp_path / "never") == (sweep.TODO, None)
    (tmp_path / "started").mkdir()
    assert sweep.job_state(tmp_path / "started") == (sweep.STARTED, None)
    write_run(tmp_path / "ok", 0.5)
    assert sweep.job_state(tmp_path / "ok") == (sweep.DONE, None)
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "results.json").write_text(json.dumps({"status": "failed", "error": "TrainingError: loss was NaN"}))
    assert sweep.job_state(failed) == (sweep.FAILED, "TrainingError: loss was NaN")
    stopped = tmp_path / "stopped"  # Ctrl-C / a scheduler's signal: not a failure, it runs again (and resumes)
    stopped.mkdir()
    (stopped / "results.json").write_text(json.dumps({"status": "failed", "error": "KeyboardInterrupt: "}))
    assert sweep.job_state(stopped) == (sweep.STARTED, None)
    (stopped / "results.json").write_text("{ half a file")
    assert sweep.job_state(stopped) == (sweep.STARTED, None)


def test_failed_jobs_run_again_only_when_asked(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    results = tmp_path / "results"
    write_run(results / "t" / "runs" / "concat__cremad" / "seed0", 0.5)
    write_run(results / "t" / "runs" / "concat__cremad" / "seed1", 0.5, status="failed")
    (results / "t" / "runs" / "ogm_ge__cremad" / "seed1").mkdir(parents=True)  # started, no result
    cells = sweep.plan(spec, [0, 1], results, root=tmp_path)  # root: kinetics_sounds has no data
    names = lambda jobs: sorted(j.name for j in jobs)  # noqa: E731
    assert names(sweep.to_run(cells)) == ["ogm_ge__cremad__s0", "ogm_ge__cremad__s1"]
    assert names(sweep.to_run(cells, retry_failed=True)) == [
        "concat__cremad__s1",
        "ogm_ge__cremad__s0",
        "ogm_ge__cremad__s1",
    ]


def test_data_root_is_the_training_configs(tmp_path, monkeypatch):
    """The sweep looks for data where training reads it: paths.data_root ($ONTHEFLY_DATA, or an override)."""
    monkeypatch.setenv("ONTHEFLY_DATA", str(tmp_path / "env"))
    assert sweep.data_root() == tmp_path / "env"
    assert sweep.data_root(["trainer.epochs=1", f"paths.data_root={tmp_path / 'cli'}"]) == tmp_path / "cli"
    monkeypatch.delenv("ONTHEFLY_DATA")
    assert sweep.data_root() == Path("data")
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    (tmp_path / "cli" / "kinetics_sounds").mkdir(parents=True)
    cells = {
        (c.row.id, c.col.id): c
        for c in sweep.plan(spec, [0], tmp_path / "r", sweep.data_root([f"paths.data_root={tmp_path / 'cli'}"]))
    }
    assert cells[("concat", "kinetics_sounds")].no_data is None


AVQA_LIKE = (
    BASE_SPEC.replace("kinetics_sounds: {{preset: demo,", "kinetics_sounds: {{preset: demo, overrides: [fusion=sum],")
    .replace("values: [test/acc]\n", "values: [test/acc]\noverrides: [fusion=concat]\n")
    .replace("[modulation=ogm_ge]", '[modulation=ogm_ge, modulation.alpha=2.6, "trainer.modalities=[audio,visual]"]')
)


def test_job_presets_compose_to_the_cells_configuration(tmp_path):
    """A job's generated preset (selected as experiment=table_job/<job> from the launch folder) composes to the
    same configuration as the cell's overrides on a command line: the preset includes the column's experiment,
    the last group choice wins (spec fusion=concat, column fusion=sum), values keep their types (floats, lists),
    and the job's output folder is its own."""
    from omegaconf import OmegaConf, open_dict

    spec = load_spec(write_spec(tmp_path, AVQA_LIKE))
    results = tmp_path / "results"
    jobs = [j for j in sweep.all_jobs(sweep.plan(spec, [2], results, root=tmp_path)) if j.row.id == "ogm_ge"]
    root = sweep.write_presets(spec, jobs, results)
    assert sorted(p.name for p in (root / "experiment" / sweep.JOB_GROUP).iterdir()) == [
        "ogm_ge__cremad__s2.yaml",
        "ogm_ge__kinetics_sounds__s2.yaml",
    ]
    for job in jobs:
        via_preset = sweep._hydra_compose(
            [f"hydra.searchpath=[file://{root.resolve()}]", f"experiment={sweep.job_option(job)}"], hydra_config=True
        )
        via_overrides = sweep._hydra_compose(sweep.job_overrides(spec, job), hydra_config=True)
        assert via_preset.hydra.sweep.subdir == f"ogm_ge__{job.col.id}/seed2"
        for cfg in (via_preset, via_overrides):
            with open_dict(cfg):
                del cfg["hydra"]
        assert OmegaConf.to_container(via_preset, resolve=True) == OmegaConf.to_container(via_overrides, resolve=True)
        assert via_preset.fusion._target_.endswith("SumFusion" if job.col.id == "kinetics_sounds" else "ConcatFusion")
        assert via_preset.modulation.alpha == 2.6 and list(via_preset.trainer.modalities) == ["audio", "visual"]
        assert via_preset.seed == 2 and via_preset.logger.group == "t" and via_preset.logger.job_type == "ogm_ge"
        assert list(via_preset.logger.tags) == ["ogm_ge", job.col.id]


def test_dry_run_prints_every_job_the_launcher_settings_and_one_command(tmp_path, monkeypatch):
    monkeypatch.delenv("ONTHEFLY_SLURM_ACCOUNT", raising=False)
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    (tmp_path / "data" / "kinetics_sounds").mkdir(parents=True)
    monkeypatch.setenv("ONTHEFLY_DATA", str(tmp_path / "data"))
    results = tmp_path / "results"
    write_run(results / "t" / "runs" / "concat__cremad" / "seed0", 0.5)
    lines = []
    sweep.run_sweep(
        spec,
        [0, 1],
        "slurm",
        ["hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600"],
        results,
        dry_run=True,
        log=lines.append,
    )
    out = "\n".join(lines)
    assert "7 to run" in out and "7 job(s) in one multirun (one Slurm job array)" in out
    for job in (
        "concat__cremad__s1",
        "ogm_ge__cremad__s0",
        "ogm_ge__kinetics_sounds__s1",
        "concat__kinetics_sounds__s0",
    ):
        assert job in out
    assert "concat__cremad__s0:" not in out  # finished: not launched again
    for setting in (
        "partition=gpu",
        "timeout_min=600",
        "gpus_per_node=1",
        "cpus_per_task=10",
        "mem_gb=64",
        "max_num_timeout=10",
        "'requeue': True",
        "signal_delay_s=120",
        "name=otf-t",
        "trainer.resume=auto",
    ):
        assert setting in out, setting
    commands = [ln.strip() for ln in lines if "onthefly.train -m" in ln]
    assert len(commands) == 1
    command = commands[0]
    assert "hydra/launcher=slurm" in command and "submitit_slurm" not in command
    assert f"hydra.sweep.dir={(results / 't' / 'runs').resolve()}" in command
    assert "experiment=table_job/concat__cremad__s1,table_job/concat__kinetics_sounds__s0," in command
    assert not (results / "t" / "launch").exists() and not (results / "t" / "launch.json").exists()  # wrote nothing


def test_launchers_are_the_repositorys_presets():
    assert sweep.LAUNCHERS == ["local", "parallel", "serial", "slurm"]
    makefile = (ROOT / "Makefile").read_text()
    assert "LAUNCHER ?= serial" in makefile and "[LAUNCHER=serial|parallel|local|slurm]" in makefile
    assert "joblib" not in makefile.split("# --- Paper tables")[1].split("# ---- Data")[0].replace("(joblib)", "")


def test_a_cell_that_does_not_compose_fails_alone(tmp_path):
    spec = load_spec(
        write_spec(tmp_path, BASE_SPEC.replace("[modulation=ogm_ge]", "[modulation=ogm_ge, modulation.alpah=1]"))
    )
    jobs = sweep.all_jobs(sweep.plan(spec, [0], tmp_path / "r", root=tmp_path))
    errors = sweep.check_cells(spec, jobs, ["trainer.epochs=1", "hydra.launcher.n_jobs=2"])
    assert sorted(errors) == [("ogm_ge", "cremad"), ("ogm_ge", "kinetics_sounds")]  # the concat cells compose
    assert "alpah" in errors[("ogm_ge", "cremad")]
    # a value its schema refuses is caught before launch as well
    spec = load_spec(
        write_spec(tmp_path, BASE_SPEC.replace("[modulation=none]", "[modulation=none, trainer.epochs=0]"), name="t2")
    )
    errors = sweep.check_cells(spec, sweep.all_jobs(sweep.plan(spec, [0], tmp_path / "r", root=tmp_path)), [])
    assert sorted(errors) == [("concat", "cremad"), ("concat", "kinetics_sounds")]
    assert "trainer.epochs=0: must be >= 1" in errors[("concat", "cremad")]


def test_unknown_launcher_is_refused(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    with pytest.raises(ValueError, match="unknown launcher 'kubernetes'; choose from"):
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
    jobs = sweep.all_jobs(sweep.plan(spec, [0, 1], results, root=tmp_path))  # no kinetics_sounds data
    summary = aggregate.summarise(spec, aggregate.local_records(spec, results, [0, 1]), seeds=[0, 1], jobs=jobs)
    wide = render.wide_table(spec, summary)
    notes = wide.attrs["notes"]
    assert wide.loc["concat", "CREMA-D acc"] == "55.0 ± 5.0"  # every seed: no n, no note
    assert wide.loc["concat", "CREMA-D acc (paper)"] == "51.7"
    assert wide.loc["concat", "CREMA-D acc Δ"] == "+3.3"
    assert wide.loc["ogm_ge", "CREMA-D acc"] == f"– [{notes.index('seeds 0,1 not run yet') + 1}]"
    no_data = wide.loc["concat", "kinetics_sounds acc"]
    assert no_data.startswith("– [") and "make prep-kinetics-sounds RAW=x" in notes[int(no_data[3:-1]) - 1]
    assert wide.loc["probe_row", "kinetics_sounds acc"] == "n/a"  # the row has no such key
    markdown = render.to_markdown(wide)
    assert markdown.splitlines()[0].startswith("| row | CREMA-D acc |")
    assert "[1] " in markdown and "make prep-kinetics-sounds RAW=x" in markdown
    latex = render.to_latex(wide, "cap", "t")
    assert r"55.0 $\pm$ 5.0" in latex and r"\begin{tabular}" in latex and "prep-kinetics-sounds RAW=x" in latex


def test_a_cell_short_of_seeds_says_how_many_and_why(tmp_path):
    """2 of 3 seeds: the mean of the two, marked (n=2), with a note naming the failed seed, its error and log;
    a cell whose every seed failed shows – with its note; reasons are in summary.csv's reason column too."""
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    results = tmp_path / "results"
    runs = results / "t" / "runs"
    write_run(runs / "concat__cremad" / "seed0", 0.50)
    write_run(runs / "concat__cremad" / "seed1", 0.70)
    for seed in (0, 1, 2):
        bad = runs / "ogm_ge__cremad" / f"seed{seed}"
        bad.mkdir(parents=True)
        (bad / "results.json").write_text(json.dumps({"status": "failed", "error": "TrainingError: loss was NaN/Inf"}))
        (bad / "train.log").write_text("…\n")
    seed2 = runs / "concat__cremad" / "seed2"
    seed2.mkdir()
    (seed2 / "results.json").write_text(json.dumps({"status": "failed", "error": "TrainingError: out of memory\nmore"}))
    jobs = sweep.all_jobs(sweep.plan(spec, [0, 1, 2], results, root=tmp_path))
    summary = aggregate.summarise(spec, aggregate.local_records(spec, results), jobs=jobs)
    wide = render.wide_table(spec, summary)
    notes = wide.attrs["notes"]
    assert wide.loc["concat", "CREMA-D acc"] == "60.0 ± 10.0 (n=2) [1]"
    assert notes[0] == f"seed 2 failed: TrainingError: out of memory (log: {seed2})"
    failed = (
        f"seeds 0,1,2 failed: TrainingError: loss was NaN/Inf (log: {runs / 'ogm_ge__cremad'}/seed{{0,1,2}}/train.log)"
    )
    assert wide.loc["ogm_ge", "CREMA-D acc"] == f"– [{notes.index(failed) + 1}]"
    assert wide.loc["probe_row", "CREMA-D probe/acc_audio"].startswith("– [")  # finished runs without probe.json
    assert any("finished without probe/acc_audio (the probe analysis has not run)" in n for n in notes)
    line = summary.set_index(["row", "col", "key"]).loc[("concat", "cremad", "test/acc")]
    assert (line["n"], line["expected"], line["seeds"]) == (2, 3, "0,1") and "out of memory" in line["reason"]
    assert render.notes_lines(wide)[0].startswith("[1] seed 2 failed")


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
    api = FakeApi(
        [
            FakeRun("a", "concat", "cremad", 0, 0.5),
            FakeRun("b", "concat", "cremad", 1, 0.7),
            FakeRun("c", "ogm_ge", "cremad", 0, 0.9, state="running"),  # unfinished: left out
            FakeRun("d", "unknown_row", "cremad", 0, 0.1),
        ]
    )  # not a row of this spec
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
    assert (
        local.loc[("concat", "cremad", "test/acc"), ["n", "mean", "std"]].tolist()
        == summary.loc[("concat", "cremad", "test/acc"), ["n", "mean", "std"]].tolist()
    )


def test_published_numbers_follow_the_rows_table_and_metric(tmp_path):
    text = BASE_SPEC.replace(
        "probe_row: {{same_runs_as: concat, values: [probe/acc_audio]}}",
        "probe_row: {{same_runs_as: concat, values: [probe/acc_audio], "
        "published: {{table: table1, fusion: audio_only, method: none, metric: acc}}}}",
    )
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
TINY_TABLE = [
    "trainer.epochs=1",
    "dataset.num_train=48",
    "dataset.num_val=24",
    "dataset.num_test=24",
    "trainer.batch_size=16",
    "trainer.eval_batch_size=24",
    "logger.mode=disabled",
]


@pytest.mark.slow
def test_reproduce_table_demo_end_to_end(tmp_path):
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "onthefly.tables",
        "--results",
        str(results),
        "run",
        "demo",
        "--seeds",
        "0",
        "--wandb",
        "disabled",
        *TINY_TABLE,
    ]
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
        spec, samples_per_s=100.0, epochs_of=lambda col: 10
    )
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
    cells = {
        tuple(o for o in spec.cell_overrides(r, c) if not o.startswith("fusion="))
        for spec in all_specs()
        for r, c in spec.run_cells()
        if not c.pending
    }
    assert len(cells) > 40
    failures = []
    for overrides in sorted(cells):
        try:
            compose(list(overrides))
        except Exception as err:  # noqa: BLE001  (collect them all, then report)
            failures.append(f"{' '.join(overrides)}: {str(err).splitlines()[0]}")
    assert not failures, "\n".join(failures)


def test_method_overrides_apply_only_to_their_method(tmp_path):
    text = BASE_SPEC.replace(
        "cremad: {{preset: demo,", "cremad: {{preset: demo, method_overrides: {{ogm_ge: [modulation.alpha=2.6]}},"
    )
    spec = load_spec(write_spec(tmp_path, text))
    rows = {r.id: r for r in spec.rows}
    col = spec.columns[0]
    assert spec.cell_overrides(rows["ogm_ge"], col)[-1] == "modulation.alpha=2.6"
    assert "modulation.alpha=2.6" not in spec.cell_overrides(rows["concat"], col)
    bad = BASE_SPEC.replace("cremad: {{preset: demo,", "cremad: {{preset: demo, method_overrides: {{ogm_gee: [x=1]}},")
    with pytest.raises(SpecError, match="unknown modulation option 'ogm_gee'"):
        load_spec(write_spec(tmp_path, bad, name="t2"))


FAILING_SPEC = """
name: {name}
title: a table with a cell that cannot run
seeds: [0, 1]
values: [test/acc]
columns:
  synth_av: {{preset: demo, label: synth}}
rows:
  none: {{overrides: [modulation=none]}}
  bad: {{overrides: [modulation=none, "trainer.modalities=[foo]"]}}
"""


@pytest.mark.slow
def test_table_sweep_with_a_failing_cell_runs_the_rest_reports_it_and_exits_1(tmp_path, monkeypatch, capsys):
    """All four jobs go into one multirun on the submitit `local` launcher; the two failing ones fail alone
    (their folders say why), the command lists them and exits 1, and they are not run again unless asked."""
    from onthefly.tables import __main__ as tables_cli

    path = write_spec(tmp_path, FAILING_SPEC)
    monkeypatch.setattr(tables_cli, "spec_path", lambda name: path)
    results = tmp_path / "results"
    argv = [
        "--results",
        str(results),
        "run",
        "t",
        "--wandb",
        "disabled",
        *TINY_TABLE,
        "trainer.threads=1",
        "trainer.plots=false",
    ]
    assert tables_cli.main([*argv, "--launcher", "local"]) == 1
    out = capsys.readouterr()
    runs = results / "t" / "runs"
    assert sweep.job_state(runs / "none__synth_av" / "seed0")[0] == sweep.DONE
    assert sweep.job_state(runs / "none__synth_av" / "seed1")[0] == sweep.DONE
    for seed in (0, 1):
        state, error = sweep.job_state(runs / "bad__synth_av" / f"seed{seed}")
        assert state == sweep.FAILED and "trainer.modalities names ['foo']" in error
        assert f"bad × synth_av, seed {seed}: TrainingError: trainer.modalities names ['foo']" in out.out
        assert f"bad__synth_av/seed{seed}/train.log" in out.out
    assert "2 job(s) of t failed" in out.err
    assert list((runs / ".submitit").iterdir()), "submitit kept no job folder"  # one submitit array ran them
    launch = json.loads((results / "t" / "launch.json").read_text())
    assert launch["launcher"] == "local" and len(launch["jobs"]) == 4 and launch["finished"]
    table = (results / "t" / "table.md").read_text()
    assert "| bad | – [1] |" in table and "[1] seeds 0,1 failed: TrainingError: trainer.modalities names" in table
    # the failed jobs stay failed: not launched again, and the command still says so
    assert tables_cli.main([*argv, "--dry-run"]) == 0
    again = capsys.readouterr().out
    assert "2 failed, 0 started, 0 not started, 0 without data; 0 to run" in again
    assert "--retry-failed" in again
    assert tables_cli.main([*argv, "--dry-run", "--retry-failed"]) == 0
    retry = capsys.readouterr().out
    assert "2 to run" in retry and "experiment=table_job/bad__synth_av__s0,table_job/bad__synth_av__s1" in retry
    # retried for real: they fail again (the cause is in the spec), and the earlier failure record is kept
    assert tables_cli.main([*argv, "--retry-failed"]) == 1
    capsys.readouterr()
    for seed in (0, 1):
        folder = runs / "bad__synth_av" / f"seed{seed}"
        assert json.loads((folder / "results.previous.json").read_text())["status"] == "failed"
        assert sweep.job_state(folder)[0] == sweep.FAILED


# --- W&B report ----------------------------------------------------------------------------------------------
def test_report_spec_has_a_section_per_dataset_with_curves_grouped_by_method(tmp_path):
    from onthefly.tables import report

    text = BASE_SPEC.replace(
        "kinetics_sounds: {{preset: demo,", "kinetics_sounds: {{preset: demo, pending: reader missing,"
    )
    spec = load_spec(write_spec(tmp_path, text))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "table.md").write_text("### a test table\n\n| row | CREMA-D acc |\n")
    rspec = report.report_spec(spec, tmp_path, project="proj", entity="lab")
    assert rspec["group"] == "t" and rspec["runs_table"]["filter"] == {"group": "t"}
    assert [s["column"] for s in rspec["sections"]] == ["cremad"]  # the pending column has no runs
    section = rspec["sections"][0]
    assert section["filter"] == {"group": "t", "tag": "cremad"}
    ys = [p["y"][0] for p in section["panels"]]
    assert ys == [
        "train/rho_audio",
        "train/rho_visual",
        "train/k_audio",
        "train/k_visual",
        "train/q_audio",
        "train/q_visual",
        "val/acc",
    ]
    assert {p["groupby"] for p in section["panels"]} == {"JobType"}  # table runs: job_type = the row
    assert rspec["published_vs_ours"].startswith("### a test table")


def test_report_offline_writes_the_specification_and_says_what_to_run(tmp_path, capsys, monkeypatch):
    from onthefly.logging import sinks
    from onthefly.tables import report

    monkeypatch.setattr(sinks, "wandb_logged_in", lambda: False)  # as on a machine without `wandb login`
    spec = load_spec(write_spec(tmp_path, BASE_SPEC))
    assert report.make_report(spec, tmp_path, project="proj") == 0
    printed = capsys.readouterr().out
    assert "no W&B login" in printed and "make report-table-t" in printed
    saved = json.loads((tmp_path / "t" / "report.json").read_text())
    assert [s["column"] for s in saved["spec"]["sections"]] == ["cremad", "kinetics_sounds"]
    # what W&B would receive, built by wandb-workspaces without a network
    grids = [b for b in saved["wandb_viewspec"]["blocks"] if b.get("type") == "panel-grid"]
    assert len(grids) == 3  # two datasets, then the runs table
    runset = grids[0]["metadata"]["runSets"][0]
    assert {"key": {"section": "run", "name": "group"}, "op": "=", "value": "t", "disabled": False} in runset[
        "filters"
    ]["filters"]
    assert any(f["key"]["name"] == "tags" and f["value"] == ["cremad"] for f in runset["filters"]["filters"])
    assert runset["grouping"] == [{"section": "run", "name": "jobType"}]
    panels = grids[0]["metadata"]["panelBankSectionConfig"]["panels"]
    assert [p["config"]["metrics"] for p in panels][0] == ["train/rho_audio"]
    assert {p["config"]["groupBy"] for p in panels} == {"jobType"}
    assert not grids[2]["metadata"]["panelBankSectionConfig"]["panels"]  # the runs table alone
    assert any(b.get("type") == "markdown-block" for b in saved["wandb_viewspec"]["blocks"])
