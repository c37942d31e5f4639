"""End-to-end training runs: every fusion head, every method, three modalities, uni-modal models, seeds."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
from omegaconf import OmegaConf

from onthefly.engine.errors import TrainingError

from conftest import EPOCHS, STEPS_PER_EPOCH, epoch_rows, read_metrics, read_results

FUSIONS = {
    "concat": [],
    "sum": [],
    "film": [],
    "gated": [],
    "mlp": ["discrepancy.estimator=zero_out"],
}


def _offline_runs(out_dir):
    return sorted((out_dir / "wandb").glob("offline-run-*"))


# --- fusion heads: every artefact a run promises --------------------------------------------------------------
@pytest.mark.slow  # the first offline W&B run of a session starts the W&B service (seconds)
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_each_fusion_writes_every_artefact(train_run, fusion):
    results, out = train_run(f"fusion={fusion}", *FUSIONS[fusion], "logger.mode=offline", "trainer.plots=true")

    for name in ("metrics.csv", "steps.csv", "results.json", "config.yaml", "best.pt"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"

    metrics = read_metrics(out)
    assert list(metrics["epoch"]) == [*range(EPOCHS), EPOCHS], "one row per epoch, then the test row"
    for col in (
        "train/loss",
        "train/acc",
        "val/acc",
        "val/map",
        "val/acc_audio",
        "val/acc_visual",
        "train/rho_audio",
        "train/rho_visual",
        "test/acc",
        "test/map",
        "time/epoch_s",
    ):
        assert col in metrics.columns, f"{col} not in metrics.csv columns {list(metrics.columns)}"
    per_epoch = epoch_rows(metrics)
    assert per_epoch["train/loss"].notna().all() and per_epoch["val/acc"].between(0, 1).all()
    assert per_epoch["train/rho_audio"].gt(0).all()
    test_row = metrics[metrics["epoch"] == EPOCHS].iloc[0]
    assert test_row[["train/loss", "val/acc"]].isna().all()

    steps = pd.read_csv(out / "steps.csv")
    assert len(steps) == EPOCHS * STEPS_PER_EPOCH
    assert list(steps["step"]) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert {"epoch", "train/loss", "train/rho_audio"} <= set(steps.columns)

    saved = read_results(out)
    assert saved["status"] == "ok"
    assert 0 <= saved["test"]["acc"] <= 1 and 0 <= saved["test"]["map"] <= 1
    assert saved["test"]["acc"] == pytest.approx(test_row["test/acc"])
    assert saved["best"]["epoch"] in range(EPOCHS) and saved["best"]["split"] == "val"
    assert saved["best"]["score"] == pytest.approx(per_epoch["val/acc"].max())
    assert saved["config"]["trainer"]["epochs"] == EPOCHS
    assert saved["config"]["fusion"]["_target_"].lower().endswith(f"{fusion}fusion")
    assert saved["modalities"] == ["audio", "visual"]
    assert saved["wandb"]["id"] and results["status"] == "ok"

    config = OmegaConf.load(out / "config.yaml")
    assert config.fusion._target_ == saved["config"]["fusion"]["_target_"]
    assert config.dataset.num_train == 64

    runs = _offline_runs(out)
    assert len(runs) == 1, f"expected one offline W&B run under {out / 'wandb'}, found {runs}"
    assert saved["wandb"]["id"] in runs[0].name
    assert list(runs[0].glob("*.wandb")), "the offline run has no .wandb log file"

    # trainer.plots=true: the ρ curves are drawn at the end of the run (k/q only for methods that log them)
    assert (out / "plots" / "rho.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "plots" / "k.png").exists()


# --- methods: each one's diagnostics ----------------------------------------------------------------------
METHODS = {
    "none": [],
    "ogm": ["train/k_audio", "train/k_visual"],
    "ogm_ge": ["train/k_audio", "train/k_visual"],
    "opm": ["train/q_audio", "train/q_visual"],
    "opm_ogm": ["train/q_audio", "train/q_visual", "train/k_audio", "train/k_visual"],
    "modality_dropout": [],
    "gblending": ["train/gbw_audio", "train/gbw_visual"],
}
DIAGNOSTIC_PREFIXES = ("train/k_", "train/q_", "train/gbw_")


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_logs_its_diagnostics(train_run, method):
    results, out = train_run(f"modulation={method}")
    assert results["status"] == "ok" and read_results(out)["status"] == "ok"

    metrics = read_metrics(out)
    steps = pd.read_csv(out / "steps.csv")
    expected = METHODS[method]
    for col in expected:
        assert col in metrics.columns and col in steps.columns, f"{col} missing for modulation={method}"
    others = [c for c in metrics.columns if c.startswith(DIAGNOSTIC_PREFIXES) and c not in expected]
    assert not others, f"modulation={method} logged another method's diagnostics: {others}"
    assert {"train/rho_audio", "train/rho_visual"} <= set(metrics.columns)  # ρ is measured for every method

    for col in (c for c in expected if c.startswith("train/k_")):
        assert steps[col].between(0, 1).all(), f"{col} outside [0, 1]: {steps[col].tolist()}"
    for col in (c for c in expected if c.startswith("train/q_")):
        assert steps[col].between(0, 1).all(), f"{col} outside [0, 1]: {steps[col].tolist()}"
    if method == "gblending":
        weights = steps[["train/gbw_audio", "train/gbw_visual"]]
        assert ((weights >= 0) & (weights <= 1)).all().all() and weights.sum(axis=1).le(1 + 1e-6).all()
    if method in ("ogm", "ogm_ge"):
        # k_m < 1 exactly where modality m is ahead (ρ_m > 1), and only there
        for m in ("audio", "visual"):
            ahead = steps[f"train/rho_{m}"] > 1
            assert (steps.loc[ahead, f"train/k_{m}"] < 1).all()
            assert (steps.loc[~ahead, f"train/k_{m}"] == 1).all()


# --- three modalities ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method, diag", [("ogm_ge", "k"), ("opm", "q")])
def test_three_modalities(train_run, method, diag):
    extra = ["modulation.scope=all"] if method == "ogm_ge" else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results, out = train_run("dataset=synth_av3", f"modulation={method}", *extra)
    assert results["modalities"] == ["audio", "visual", "sensor"]
    idle = [str(w.message) for w in caught if "selects no parameter" in str(w.message)]
    assert not idle, f"an encoder escaped modulation: {idle}"

    metrics, steps = read_metrics(out), pd.read_csv(out / "steps.csv")
    for m in ("audio", "visual", "sensor"):
        for name in ("rho", diag):
            assert f"train/{name}_{m}" in metrics.columns and f"train/{name}_{m}" in steps.columns
        assert f"val/acc_{m}" in metrics.columns and f"test/acc_{m}" in metrics.columns
        assert steps[f"train/{diag}_{m}"].between(0, 1).all(), f"train/{diag}_{m}"
    assert 0 <= results["test"]["acc"] <= 1


def test_ogm_on_an_mlp_encoder_warns_when_scope_is_conv(tmp_path):
    """With scope=conv the sensor MLP has no 4-D weight: OGM says it leaves that encoder alone. The default scope
    (auto) modulates the MLP's matrices instead, and says nothing."""
    import warnings

    from onthefly.config import compose
    from onthefly.engine.run import run

    base = [
        "debug=fast",
        "dataset=synth_av3",
        "modulation=ogm_ge",
        "dataset.num_train=16",
        "dataset.num_val=16",
        "dataset.num_test=16",
        "trainer.batch_size=16",
        "trainer.epochs=1",
        "trainer.threads=1",
        "trainer.eval_test=false",
        "trainer.save_checkpoint=false",
    ]
    with pytest.warns(UserWarning, match="sensor encoder.*modulation.scope=all"):
        run(compose([*base, "modulation.scope=conv"]), tmp_path / "conv")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*selects no parameter.*")
        run(compose(base), tmp_path / "auto")


# --- uni-modal models ---------------------------------------------------------------------------------------
def test_unimodal_run_without_modulation(train_run):
    results, out = train_run("trainer.modalities=[audio]", "modulation=none")
    assert results["modalities"] == ["audio"]
    metrics = read_metrics(out)
    assert not [c for c in metrics.columns if "rho" in c or "visual" in c], list(metrics.columns)
    assert "val/acc" in metrics.columns and "val/acc_audio" not in metrics.columns
    assert read_results(out)["status"] == "ok"


def test_unimodal_run_with_a_balancing_method_fails_clearly(train_run):
    with pytest.raises(TrainingError, match=r"only \['audio'\].*modulation=none"):
        train_run("trainer.modalities=[audio]", "modulation=ogm_ge")


def test_unknown_modality_fails_clearly(train_run):
    with pytest.raises(TrainingError, match=r"trainer.modalities names \['depth'\]"):
        train_run("trainer.modalities=[audio,depth]")


# --- estimator --------------------------------------------------------------------------------------------
def test_mlp_fusion_needs_zero_out_estimator_for_ogm(train_run, tmp_path):
    with pytest.raises(TrainingError, match=r"discrepancy\.estimator=zero_out"):
        train_run("fusion=mlp", "modulation=ogm_ge")
    saved = read_results(tmp_path / "run")
    assert saved["status"] == "failed" and "discrepancy.estimator=zero_out" in saved["error"]


def test_mlp_fusion_without_rho_method_warns_and_drops_diagnostics(train_run):
    with pytest.warns(UserWarning, match="no natural uni-modal estimator"):
        results, out = train_run("fusion=mlp", "modulation=none")
    metrics = read_metrics(out)
    assert not [c for c in metrics.columns if "rho" in c or "acc_audio" in c], list(metrics.columns)
    assert results["status"] == "ok"


# --- reproducibility ----------------------------------------------------------------------------------------
def _numbers(out) -> pd.DataFrame:
    metrics = read_metrics(out)
    return metrics.drop(columns=[c for c in metrics.columns if c.startswith("time/")])


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_differs(train_run):
    _, a = train_run("seed=3", "modulation=ogm_ge", name="a")
    _, b = train_run("seed=3", "modulation=ogm_ge", name="b")
    _, c = train_run("seed=4", "modulation=ogm_ge", name="c")
    assert "time/epoch_s" in read_metrics(a).columns
    pd.testing.assert_frame_equal(_numbers(a), _numbers(b), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(a / "steps.csv"), pd.read_csv(b / "steps.csv"), check_exact=True)
    assert read_results(a)["test"] == read_results(b)["test"]
    assert not _numbers(a).equals(_numbers(c)), "seed=4 gave the very same numbers as seed=3"


def test_a_trailing_batch_of_one_clip_is_dropped_not_fatal(train_run):
    """65 training clips in batches of 16 leave one clip over: BatchNorm cannot train on a batch of one
    (ResNet18's last stage is 1x1 here), so that batch is dropped and the epoch has 4 steps, not 5."""
    results, out = train_run(
        "dataset.num_train=65",
        "trainer.batch_size=16",
        "trainer.epochs=1",
        "trainer.limit_train_batches=null",
        name="odd",
    )
    assert results["status"] == "ok"
    import pandas as pd

    steps = pd.read_csv(out / "steps.csv")
    assert len(steps) == 4
