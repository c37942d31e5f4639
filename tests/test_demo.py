"""The demo (`make demo`): its table from the table machinery's records (means, paired differences, selected
epochs), the committed copy in docs/demo.md, and the README showing that same table."""

from __future__ import annotations

import pandas as pd
import pytest

from onthefly import demo
from onthefly.tables.spec import load_spec, spec_path

ROWS = [("none", "joint (none)"), ("opm", "joint + OPM"), ("visual_only", "visual only")]


def _records() -> pd.DataFrame:
    lines = []
    for seed, (joint, opm, vis) in enumerate([(0.60, 0.70, 0.80), (0.62, 0.66, 0.78), (0.58, 0.70, 0.82)]):
        lines.append(
            {
                "row": "none",
                "col": "synth_av",
                "seed": seed,
                "test/acc": joint,
                "test/acc_audio": 0.5,
                "test/acc_visual": 0.3,
                "probe/acc_audio": 0.55,
                "probe/acc_visual": 0.60 + 0.01 * seed,
                "best/epoch": 5 + seed,
                "modalities": None,
            }
        )
        lines.append(
            {
                "row": "opm",
                "col": "synth_av",
                "seed": seed,
                "test/acc": opm,
                "test/acc_audio": 0.52,
                "test/acc_visual": 0.6,
                "probe/acc_audio": 0.56,
                "probe/acc_visual": 0.80 - 0.01 * seed,
                "best/epoch": 9,
                "modalities": None,
            }
        )
        lines.append(
            {
                "row": "visual_only",
                "col": "synth_av",
                "seed": seed,
                "test/acc": vis,
                "probe/acc_visual": 0.85,
                "best/epoch": 11,
                "modalities": "visual",
            }
        )
    return pd.DataFrame(lines)


def test_table_means_paired_differences_and_selected_epochs():
    table = demo.demo_table(_records(), ROWS)
    assert list(table.index) == ["joint (none)", "joint + OPM", "visual only"]
    assert list(table.columns) == [*demo.COLUMNS, *demo.PAIRED, "selected epoch"]
    # joint: 60, 62, 58 -> 60.0 ± 1.6 (population std)
    assert table.loc["joint (none)", "fused acc"] == "60.0 ± 1.6"
    assert table.loc["joint (none)", "Δ fused acc"] == "ref."
    # OPM minus joint per seed: +10, +4, +12 -> mean 8.67, population std 3.40; all three positive
    assert table.loc["joint + OPM", "Δ fused acc"] == "+8.7 ± 3.4 (3/3)"
    # probe visual: OPM 80, 79, 78 minus joint 60, 61, 62 -> 20, 18, 16; probe audio: 56 - 55 in every seed
    assert table.loc["joint + OPM", "Δ probe visual"] == "+18.0 ± 1.6 (3/3)"
    assert table.loc["joint + OPM", "Δ probe audio"] == "+1.0 ± 0.0 (3/3)"
    assert table.loc["visual only", "Δ probe audio"] == "–"  # no audio encoder to compare
    # a uni-modal model's accuracy is its modality's; it has no audio numbers at all
    assert table.loc["visual only", "acc visual"] == table.loc["visual only", "fused acc"] == "80.0 ± 1.6"
    assert table.loc["visual only", "acc audio"] == "–" and table.loc["visual only", "probe audio"] == "–"
    assert table.loc["visual only", "Δ fused acc"] == "+20.0 ± 3.3 (3/3)"
    assert table.loc["joint (none)", "selected epoch"] == "5–7"
    assert table.loc["joint + OPM", "selected epoch"] == "9–9"


def test_paired_differences_count_negative_seeds_and_skip_unpaired_ones():
    records = _records()
    records.loc[(records["row"] == "opm") & (records["seed"] == 1), "test/acc"] = 0.50  # worse than joint there
    records = records[~((records["row"] == "none") & (records["seed"] == 2))]  # joint seed 2 missing
    table = demo.demo_table(records, ROWS)
    # seeds 0 and 1 only: +10 and -12 -> -1.0 ± 11.0, one of two positive
    assert table.loc["joint + OPM", "Δ fused acc"] == "-1.0 ± 11.0 (1/2)"


def test_markdown_and_the_drift_check(tmp_path):
    table = demo.demo_table(_records(), ROWS)
    markdown = demo.to_markdown(table)
    lines = markdown.splitlines()
    assert lines[0].startswith("| method | fused acc |") and lines[1].startswith("|---|")
    assert len(lines) == 2 + len(ROWS)
    block = f"{markdown}\n\nmeasured on a machine, wall time 1 min"
    same, _ = demo.compare(block, f"{markdown}\n\nmeasured elsewhere, wall time 9 min")
    assert same  # the measured-on line is not part of the comparison
    changed = markdown.replace("60.0 ± 1.6", "61.0 ± 1.6", 1)
    same, diff = demo.compare(block, changed)
    assert not same and any("61.0 ± 1.6" in line for line in diff) and any("60.0 ± 1.6" in line for line in diff)
    assert demo.compare(block, None)[0] is False

    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{demo.BEGIN}\nold\n{demo.END}\nafter\n")
    assert demo.read_block(doc) == "old"
    assert demo.write_block(doc, block)
    assert demo.read_block(doc) == block
    assert doc.read_text().startswith("intro\n") and doc.read_text().endswith(f"{demo.END}\nafter\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers")
    assert demo.read_block(plain) is None and not demo.write_block(plain, block)
    assert plain.read_text() == "no markers"


def test_the_committed_table_is_the_demos_and_the_readme_shows_it():
    committed = demo.read_block(demo.DOCS)
    assert committed is not None, f"{demo.DOCS} must hold the demo table between {demo.BEGIN} and {demo.END}"
    spec = load_spec(spec_path(demo.SPEC))
    rows = demo.table_lines(committed)
    expected_header = "| " + " | ".join(["method", *demo.COLUMNS, *demo.PAIRED, "selected epoch"]) + " |"
    assert rows[0] == expected_header
    assert [r.split("|")[1].strip() for r in rows[2:]] == [r.label or r.id for r in spec.rows]
    assert "seeds " + ",".join(map(str, spec.seeds)) in committed  # the table says which seeds it averages
    readme = demo.read_block(demo.README)
    assert readme is not None, f"README.md must show the demo table between {demo.BEGIN} and {demo.END}"
    assert readme == committed, "README.md's demo table differs from docs/demo.md: copy the block over"


def test_runs_with_overrides_get_their_own_folder():
    assert str(demo.default_results([])) == "outputs"
    a, b = demo.default_results(["trainer.epochs=2"]), demo.default_results(["trainer.epochs=3"])
    assert a != b and a.parent == b.parent and a == demo.default_results(["trainer.epochs=2"])


@pytest.mark.slow
def test_demo_end_to_end_through_the_table_machinery(tmp_path, capsys):
    """The one command, on tiny settings: trains every row through the parallel launcher, probes, prints the
    table, and a second call reuses every run."""
    overrides = [
        "trainer.epochs=1",
        "dataset.num_train=48",
        "dataset.num_val=24",
        "dataset.num_test=24",
        "trainer.batch_size=16",
        "trainer.eval_batch_size=24",
        "logger.mode=disabled",
    ]
    args = ["--seeds", "0", "--results", str(tmp_path), "--wandb", "disabled", "--jobs", "2", *overrides]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "through the table machinery" in out and "not compared with the committed table" in out
    written = (tmp_path / "demo" / "demo.md").read_text()
    spec = load_spec(spec_path(demo.SPEC))
    rows = demo.table_lines(written)
    assert len(rows) == 2 + len(spec.rows)
    joint = next(r for r in rows if r.startswith("| joint (none) |"))
    assert "ref." in joint and "–" not in joint.split("|")[2]
    assert all((tmp_path / "demo" / "runs" / f"{r.id}__synth_av" / "seed0" / "probe.json").exists() for r in spec.rows)
    assert (tmp_path / "demo" / "table.md").exists() and list((tmp_path / "demo" / "plots").glob("*.png"))
    assert demo.main(args) == 0
    again = capsys.readouterr().out
    assert f"{len(spec.rows)} of the {len(spec.rows)} runs are already done" in again
