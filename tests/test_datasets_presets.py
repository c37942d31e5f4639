"""The real datasets' config: dataset options, the flow encoder UCF-101 brings, and the METHOD.md §8 presets."""
from __future__ import annotations

import functools

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from onthefly.config import CONF_DIR, compose

PRESETS = sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                 for d in ("cvpr2022", "tpami2024") for p in (CONF_DIR / "experiment" / d).glob("*.yaml"))
# presets that leave the method open (the table code adds fusion=... modulation=...)
OPEN = [p for p in PRESETS if p.split("/")[1] in ("base", "cremad", "kinetics_sounds", "vggsound", "ucf101")]


@functools.lru_cache(maxsize=None)
def _cfg(*overrides: str):
    return compose(list(overrides))


def test_both_protocols_cover_their_datasets():
    assert {f"cvpr2022/{d}" for d in ("cremad", "kinetics_sounds", "vggsound")} <= set(PRESETS)
    assert {f"tpami2024/{d}" for d in ("cremad", "kinetics_sounds", "vggsound", "ucf101")} <= set(PRESETS)
    assert "cvpr2022/cremad_concat_ogm_ge" in PRESETS


@pytest.mark.parametrize("preset", OPEN)
@pytest.mark.parametrize("modulation", ["none", "opm_ogm"])
def test_open_presets_compose_with_any_method(preset, modulation):
    cfg = _cfg(f"experiment={preset}", f"modulation={modulation}", "fusion=sum")
    assert cfg.fusion._target_.endswith("SumFusion")
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("preset,expected", [
    ("cvpr2022/cremad", {"optim._target_": "torch.optim.SGD", "optim.lr": 1e-3, "optim.momentum": 0.9,
                         "optim.weight_decay": 1e-4, "scheduler.step_size": 70, "scheduler.gamma": 0.1,
                         "trainer.epochs": 100, "trainer.batch_size": 64, "backbone.name": "resnet18",
                         "dataset.num_frames": 1, "dataset.image_size": 224, "dataset.audio_recipe": "ogm_ge"}),
    ("cvpr2022/vggsound", {"optim._target_": "torch.optim.SGD", "trainer.batch_size": 64, "dataset.num_frames": 3,
                           "dataset.audio_crop": 626}),
    ("cvpr2022/kinetics_sounds", {"dataset._target_": "onthefly.data.kinetics_sounds.KineticsSounds",
                                  "dataset.num_frames": 3, "dataset.image_size": 224}),
    ("tpami2024/kinetics_sounds", {"optim._target_": "torch.optim.AdamW", "optim.lr": 5e-5, "optim.weight_decay": 0.01,
                                   "scheduler.step_size": 40, "trainer.batch_size": 32, "trainer.epochs": 100,
                                   "dataset.image_size": 112, "dataset.sampling": "spread",
                                   "dataset.crop_scale": [0.25, 1.0]}),
    ("tpami2024/cremad", {"optim._target_": "torch.optim.AdamW", "optim.lr": 1e-3, "scheduler.step_size": 20,
                          "trainer.batch_size": 32}),
    ("tpami2024/ucf101", {"dataset._target_": "onthefly.data.ucf101.UCF101", "backbone.encoders.flow.in_channels": 2,
                          "backbone.encoders.flow.width": 64}),
])
def test_presets_hold_the_protocol_settings(preset, expected):
    cfg = OmegaConf.to_container(_cfg(f"experiment={preset}", "modulation=none"), resolve=True, enum_to_str=True)
    for key, value in expected.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(value) if isinstance(value, float) else node == value, key


def test_readme_example_preset_fixes_concat_and_ogm_ge_with_the_papers_alpha():
    cfg = _cfg("dataset=cremad", "experiment=cvpr2022/cremad_concat_ogm_ge")
    assert cfg.fusion._target_.endswith("ConcatFusion") and cfg.modulation._target_.endswith("OGM")
    assert (cfg.modulation.alpha, cfg.modulation.start, cfg.modulation.end, cfg.modulation.ge) == (0.8, 0, 50, True)
    assert cfg.dataset._target_.endswith("CremaD") and cfg.optim._target_ == "torch.optim.SGD"
    assert _cfg("experiment=cvpr2022/cremad_concat_ogm_ge", "debug=fast").trainer.epochs == 2  # debug still wins


def test_dataset_roots_follow_the_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ONTHEFLY_DATA", str(tmp_path))
    for name in ("cremad", "kinetics_sounds", "vggsound", "ucf101"):
        cfg = compose([f"dataset={name}"])
        assert OmegaConf.to_container(cfg.dataset, resolve=True)["root"] == f"{tmp_path}/{name}"


def test_flow_encoder_keeps_the_backbone_typed():
    with pytest.raises(ConfigCompositionException):
        compose(["dataset=ucf101", "backbone.widht=4"])
    with pytest.raises(ConfigCompositionException):
        compose(["dataset=ucf101", "dataset.fold=x"])
