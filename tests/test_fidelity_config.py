"""`fidelity=official` (conf/fidelity/): it composes with every preset, dataset and method, sets only options that
exist, wins over a preset's values, loses to the command line and to a table cell's own values, and clean changes
nothing. The table side: the fidelity of a spec, its folder, group and header."""

from __future__ import annotations

import functools

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from onthefly.config import CONF_DIR, compose
from onthefly.tables import sweep
from onthefly.tables.spec import EXPERIMENTS_DIR, SpecError, load_spec

PRESETS = sorted(
    p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix() for p in (CONF_DIR / "experiment").rglob("*.yaml")
)
DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
METHODS = ["none", "ogm", "ogm_ge", "opm", "opm_ogm"]


@functools.cache
def _plain(*overrides: str) -> dict:
    return OmegaConf.to_container(compose(list(overrides), environment=False), resolve=True, enum_to_str=True)


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("preset", PRESETS)
def test_official_composes_with_every_preset_and_builds_its_options(preset):
    cfg = compose([f"experiment={preset}", "fidelity=official"], environment=False)
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert plain["fidelity"] == "official" and plain["trainer"]["select_on"] == "test"
    assert plain["release"] == preset.split("/")[0] if "/" in preset else plain["release"] == "none"
    instantiate(cfg.dataset)  # the dataset's options are valid together (no file is read)
    instantiate(cfg.modulation)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_official_composes_with_every_dataset_and_method(dataset, method):
    cfg = compose([f"dataset={dataset}", f"modulation={method}", "fidelity=official"], environment=False)
    instantiate(cfg.dataset)
    instantiate(cfg.modulation)


@pytest.mark.parametrize("preset", ["cvpr2022/cremad", "tpami2024/kinetics_sounds", "tpami2024/mosi", "demo"])
def test_clean_is_the_default_and_changes_nothing(preset):
    assert _plain(f"experiment={preset}", "fidelity=clean") == _plain(f"experiment={preset}")
    assert _plain(f"experiment={preset}")["fidelity"] == "clean"


def test_official_sets_each_datasets_released_loader():
    cremad = _plain("experiment=cvpr2022/cremad", "fidelity=official")["dataset"]
    assert cremad["root"].endswith("/cremad_official") and cremad["split"] == "lists"
    assert (cremad["sampling"], cremad["frame_times"], cremad["val_fraction"]) == ("first", "second_start", 0.0)
    vgg = _plain("experiment=cvpr2022/vggsound", "fidelity=official")["dataset"]
    assert (vgg["audio_recipe"], vgg["audio_eval_window"], vgg["min_frames"], vgg["downmix"]) == (
        "segment",
        "random",
        4,
        "mean",
    )
    assert (vgg["sampling"], vgg["frame_crops"]) == ("first", "per_frame")
    ks_cvpr = _plain("experiment=cvpr2022/kinetics_sounds", "fidelity=official")["dataset"]
    assert (ks_cvpr["sampling"], ks_cvpr["frame_crops"], ks_cvpr["downmix"]) == ("segment_starts", "per_frame", "first")
    # the journal's loader wins over the preset's own `sampling: spread` (fidelity comes after the presets)
    ks_journal = _plain("experiment=tpami2024/kinetics_sounds", "fidelity=official")["dataset"]
    assert _plain("experiment=tpami2024/kinetics_sounds")["dataset"]["sampling"] == "spread"
    assert (ks_journal["sampling"], ks_journal["eval_resize"], ks_journal["frame_crops"]) == (
        "spread_shifted",
        "crop",
        "shared",
    )
    assert ks_journal["image_size"] == 112  # what the preset sets and fidelity does not stays
    ucf = _plain("experiment=tpami2024/ucf101", "fidelity=official")["dataset"]
    assert ucf["val_fraction"] == 0.0 and "frame_times" not in ucf  # only options the dataset has


def test_the_command_line_wins_over_official():
    cfg = _plain(
        "experiment=tpami2024/kinetics_sounds",
        "fidelity=official",
        "dataset.sampling=segments",
        "trainer.select_on=val",
        "dataset.root=/mine",
    )
    assert cfg["dataset"]["sampling"] == "segments" and cfg["trainer"]["select_on"] == "val"
    assert cfg["dataset"]["root"] == "/mine" and cfg["dataset"]["eval_resize"] == "crop"


def test_official_methods_and_heads_per_release():
    cvpr_ogm = _plain("experiment=cvpr2022/cremad", "modulation=ogm", "fidelity=official")["modulation"]
    assert (cvpr_ogm["ge"], cvpr_ogm["tie_modality"]) == (False, "first")  # CVPR: OGM rows without noise
    journal_ogm = _plain("experiment=tpami2024/cremad", "modulation=ogm", "fidelity=official")["modulation"]
    assert (journal_ogm["ge"], journal_ogm["tie_modality"]) == (True, "second")  # the journal's "OGM" ran with GE
    assert _plain("experiment=tpami2024/cremad", "modulation=ogm")["modulation"]["ge"] is False
    opm = _plain("modulation=opm_ogm", "fidelity=official")["modulation"]
    assert (opm["opm"]["rescale_grad"], opm["opm"]["exe_draw"], opm["ogm"]["tie_modality"]) == (
        True,
        "global_batch",
        "first",
    )
    for fusion in ("film", "gated"):
        assert _plain(f"fusion={fusion}", "fidelity=official")["fusion"]["level"] == "feature"
        assert _plain(f"fusion={fusion}")["fusion"]["level"] == "logit"
    assert "level" not in _plain("fusion=concat", "fidelity=official")["fusion"]


def test_each_option_can_be_turned_on_alone():
    cfg = _plain("experiment=tpami2024/cremad", "modulation=opm", "modulation.rescale_grad=true")
    assert cfg["modulation"]["rescale_grad"] is True and cfg["trainer"]["select_on"] == "val"
    assert cfg["modulation"]["exe_draw"] == "per_rank" and cfg["dataset"]["sampling"] == "segments"
    cfg = _plain("dataset=vggsound", "dataset.audio_recipe=segment", "dataset.frame_crops=per_frame")
    assert cfg["dataset"]["audio_recipe"] == "segment" and cfg["dataset"]["audio_eval_window"] == "centre"


def test_a_table_cells_own_values_win_over_official(tmp_path):
    """A generated job (experiment=table_job/<job>) composes like its command line: the cell's own value wins over
    fidelity=official's, the other official options apply."""
    spec_path = tmp_path / "t.yaml"
    spec_path.write_text("""
name: t
title: t
fidelity: official
columns:
  ks: {preset: tpami2024/kinetics_sounds}
rows:
  mine: {overrides: [modulation=ogm, dataset.sampling=segments]}
  clean_row: {overrides: [modulation=ogm], fidelity: clean}
""")
    spec = load_spec(spec_path)
    results = tmp_path / "results"
    jobs = sweep.all_jobs(sweep.plan(spec, [0], results, root=tmp_path))
    root = sweep.write_presets(spec, jobs, results)
    assert root == results / "t" / "official" / "launch"
    for job in jobs:
        via_preset = sweep._hydra_compose(
            [f"hydra.searchpath=[file://{root.resolve()}]", f"experiment={sweep.job_option(job)}"]
        )
        via_line = sweep._hydra_compose(sweep.job_overrides(spec, job))
        for cfg in (via_preset, via_line):
            plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            if job.row.id == "mine":
                assert plain["fidelity"] == "official" and plain["dataset"]["sampling"] == "segments"
                assert plain["dataset"]["eval_resize"] == "crop" and plain["modulation"]["ge"] is True
            else:
                assert plain["fidelity"] == "clean" and plain["dataset"]["sampling"] == "spread"
            assert plain["logger"]["group"] == "t-official"


def test_spec_fidelity_default_folder_group_and_header():
    spec = load_spec(EXPERIMENTS_DIR / "cvpr-t1.yaml")
    assert (spec.fidelity, spec.folder, spec.group) == ("official", "cvpr-t1/official", "cvpr-t1-official")
    assert "[fidelity: official]" in spec.heading
    clean = load_spec(EXPERIMENTS_DIR / "cvpr-t1.yaml", "clean")
    assert (clean.folder, clean.group) == ("cvpr-t1", "cvpr-t1")
    row, col = clean.rows[0], clean.columns[0]
    assert "fidelity=clean" in clean.cell_overrides(row, col) and "fidelity=official" in spec.cell_overrides(row, col)
    # an official cell needs the official cache
    assert spec.data_folder(row, col) == "cremad_official" and clean.data_folder(row, col) == "cremad"
    for name in ("cvpr-t1", "cvpr-t2", "cvpr-t6", "cvpr-t7", "journal-main", "fusion", "robustness"):
        assert load_spec(EXPERIMENTS_DIR / f"{name}.yaml").default_fidelity == "official", name
    for name in ("demo", "noise", "probe", "estimator"):
        assert load_spec(EXPERIMENTS_DIR / f"{name}.yaml").default_fidelity == "clean", name
    with pytest.raises(SpecError, match="fidelity 'exact' is not one of"):
        load_spec(EXPERIMENTS_DIR / "demo.yaml", "exact")


def test_fidelity_ablation_rows_pin_their_fidelity_and_compose(tmp_path):
    spec = load_spec(EXPERIMENTS_DIR / "fidelity-ablation.yaml")
    assert {c.id for c in spec.columns} == {"cremad", "kinetics_sounds"}
    assert [r.id for r in spec.rows][0] == "clean" and spec.rows[-1].fidelity == "official"
    assert spec.fidelity_text == "clean; row official: official"
    jobs = sweep.all_jobs(sweep.plan(spec, [0], tmp_path, root=tmp_path))
    assert sweep.check_cells(spec, jobs, []) == {}
    prep = next(r for r in spec.rows if r.id == "prep")
    assert spec.data_folder(prep, spec.columns[1]) == "kinetics_sounds_official"


def test_a_spec_may_not_set_fidelity_as_an_override(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("name: t\ntitle: t\ncolumns: {c: {preset: demo}}\nrows: {r: {overrides: [fidelity=official]}}\n")
    with pytest.raises(SpecError, match="a table sets fidelity itself"):
        load_spec(path)


def test_journal_main_gives_ucf101_and_vggsound_their_ogm_settings():
    spec = load_spec(EXPERIMENTS_DIR / "journal-main.yaml")
    cols = {c.id: c for c in spec.columns}
    assert {"modulation.alpha=0.8", "modulation.end=60"} <= set(cols["ucf101"].method_overrides["ogm"])
    assert {"modulation.alpha=0.1", "modulation.end=60"} <= set(cols["vggsound"].method_overrides["ogm_ge"])
    assert "modulation.ogm.end=60" in cols["ucf101"].method_overrides["opm_ogm"]
