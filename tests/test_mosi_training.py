"""CMU-MOSI end to end: a generated MulT-style pickle -> `data_prep.mosi` -> training with three sequence encoders.

The generated sentiment score is written into the first feature of every modality (strongly in text, weakly in
audio and visual), so the runs have something to learn; the tests check what a run logs and reports, not how
well it learns in two epochs.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest

from data_prep import mosi as prep
from onthefly.config import compose
from onthefly.engine.run import run
from onthefly.models.encoders import ResNet18
from onthefly.models.sequence import LSTMSequenceEncoder, TransformerSequenceEncoder
from onthefly.modulation.ogm import select_parameters

from conftest import read_results

MODALITIES = ("text", "audio", "visual")
STEPS = {"text": (6, 20), "audio": (9, 5), "vision": (7, 8)}  # (time steps, feature size): unaligned


def write_mosi_pickle(path, sizes=(48, 16, 24), seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in zip(("train", "valid", "test"), sizes):
        score = rng.uniform(-3, 3, n).round(1)
        score[:2] = 0.0  # neutral segments
        d = {}
        for m, (t, dim) in STEPS.items():
            x = rng.normal(size=(n, t, dim)) * 0.5
            x[:, :, 0] += score[:, None] * (1.0 if m == "text" else 0.3)
            for i, length in enumerate(rng.integers(2, t + 1, n)):
                x[i, length:] = 0
            d[m] = x.astype(np.float32)
        d["audio"][0, 0, 1] = -np.inf
        d["vision"][1, 0, 2] = np.nan
        d["labels"] = score.reshape(n, 1, 1).astype(np.float32)
        d["id"] = np.array([f"{split}{i}" for i in range(n)])
        data[split] = d
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


@pytest.fixture(scope="module")
def mosi_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosi")
    pkl = write_mosi_pickle(root / "mosi_data_noalign.pkl")
    prep.main([f"pkl={pkl}", f"out_root={root / 'cache'}"])
    return root / "cache"


def mosi_overrides(cache, *extra):
    return [
        "dataset=mosi",
        f"dataset.root={cache}",
        "debug=fast",
        "trainer.batch_size=16",
        "trainer.eval_batch_size=32",
        "trainer.limit_train_batches=null",
        "trainer.limit_eval_batches=null",
        "trainer.threads=1",
        "trainer.plots=false",
        "backbone.width=16",
        *extra,
    ]


@pytest.mark.parametrize(
    "modulation,logged",
    [
        ("none", ["rho", "acc"]),
        ("ogm_ge", ["rho", "acc", "k"]),
        ("opm", ["rho", "acc", "q", "drop"]),
    ],
)
def test_mosi_trains_with_three_modalities_and_logs_rho_k_q(mosi_cache, tmp_path, modulation, logged):
    out = tmp_path / modulation
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. OGM selecting no parameter of a sequence encoder
        results = run(compose(mosi_overrides(mosi_cache, f"modulation={modulation}")), out)
    assert results["status"] == "ok" and results["modalities"] == list(MODALITIES)
    steps = pd.read_csv(out / "steps.csv")
    for name in logged:
        for m in MODALITIES:
            column = f"train/{name}_{m}"
            assert column in steps.columns, f"{column} not logged: {list(steps.columns)}"
            assert steps[column].notna().all()
    assert steps["train/rho_text"].gt(0).all()
    if modulation == "ogm_ge":
        assert steps[[f"train/k_{m}" for m in MODALITIES]].le(1).all().all()
        assert steps[[f"train/k_{m}" for m in MODALITIES]].lt(1).any().any(), "OGM never slowed a modality"
    test = read_results(out)["test"]
    for key in ("acc", "f1", "acc_nonzero", "f1_nonzero", "acc_text", "acc_audio", "acc_visual"):
        assert 0 <= test[key] <= 1, key
    assert "mae" not in test  # a classification head
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"val/acc", "val/f1", "val/acc_nonzero", "val/f1_nonzero"} <= set(metrics.columns)


def test_mosi_lstm_with_a_regression_head_reports_mae_corr_acc7(mosi_cache, tmp_path):
    results = run(
        compose(mosi_overrides(mosi_cache, "backbone=lstm", "task.head=regression", "modulation=opm_ogm")),
        tmp_path / "reg",
    )
    test = results["test"]
    assert test["mae"] >= 0 and -1 <= test["corr"] <= 1 and 0 <= test["acc7"] <= 1
    assert test["loss"] == pytest.approx(test["mae"])  # the L1 loss is the MAE
    steps = pd.read_csv(tmp_path / "reg" / "steps.csv")
    assert {f"train/q_{m}" for m in MODALITIES} | {f"train/k_{m}" for m in MODALITIES} <= set(steps.columns)


def test_ogm_auto_scope_picks_conv_kernels_or_every_matrix():
    resnet = ResNet18(in_channels=1, width=4, stem="small")
    assert select_parameters(resnet, "auto") == select_parameters(resnet, "conv")
    for enc in (TransformerSequenceEncoder(5, 8, heads=2), LSTMSequenceEncoder(5, 8)):
        assert select_parameters(enc, "conv") == []
        chosen = select_parameters(enc, "auto")
        assert chosen and chosen == select_parameters(enc, "all")


def test_an_image_backbone_on_mosi_fails_naming_the_sequence_backbones(mosi_cache, tmp_path):
    with pytest.raises(ValueError, match="backbone=transformer or lstm"):
        run(
            compose(
                mosi_overrides(
                    mosi_cache,
                    "backbone=resnet18_small",
                    "+backbone.encoders.text={_target_:onthefly.models.encoders.ResNet18}",
                )
            ),
            tmp_path / "bad",
        )


def test_mosi_presets_set_the_sequence_backbone_task_and_methods():
    for method in ("none", "ogm_ge", "opm", "opm_ogm"):
        cfg = compose([f"experiment=tpami2024/mosi_{method}"])
        assert cfg.dataset._target_.endswith("MOSI") and cfg.backbone.name == "transformer"
        assert cfg.task._target_.endswith("Sentiment") and cfg.optim._target_ == "torch.optim.AdamW"
        assert (
            cfg.modulation._target_.rsplit(".", 1)[1]
            == {"none": "NoModulation", "ogm_ge": "OGM", "opm": "OPM", "opm_ogm": "OPMOGM"}[method]
        )
    assert compose(["dataset=mosi", "backbone=lstm"]).backbone.name == "lstm"  # the command line still wins


@pytest.mark.slow
def test_mosi_under_torchrun_gathers_sequences_and_scores_like_one_process(mosi_cache, tmp_path):
    """Two CPU ranks: inputs are dicts (sequences with lengths) and the score rides along as a side target; the
    sharded test evaluation must give what one process computes from the saved weights."""
    import socket
    import subprocess
    import sys

    from onthefly.data.loaders import make_loader
    from onthefly.engine import analysis
    from onthefly.engine.evaluation import evaluate
    from onthefly.tasks import build_task

    from conftest import subprocess_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "onthefly.train",
        *mosi_overrides(mosi_cache, "modulation=opm_ogm", "trainer.epochs=1", "trainer.eval_batch_size=10"),
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    saved = read_results(run_dir)
    assert saved["world_size"] == 2 and {"f1", "acc_nonzero"} <= set(saved["test"])

    cfg, model, splits, device = analysis.load_run(run_dir, "cpu")
    single = evaluate(
        model, make_loader(splits.test, 7, False, 0, 0, device), device, "natural", task=build_task(cfg, splits)
    )
    for key in ("acc", "f1", "acc_nonzero", "f1_nonzero", "acc_text", "acc_audio", "acc_visual"):
        assert saved["test"][key] == pytest.approx(single[key], abs=1e-6), key
    assert saved["test"]["loss"] == pytest.approx(single["loss"], rel=1e-4)
