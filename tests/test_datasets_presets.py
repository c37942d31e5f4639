"""The real datasets' config: dataset options, the flow encoder UCF-101 brings, and the docs/method.md §8 presets."""

from __future__ import annotations

import functools
import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from onthefly.config import CONF_DIR, compose

PRESETS = sorted(
    p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
    for d in ("cvpr2022", "tpami2024")
    for p in (CONF_DIR / "experiment" / d).glob("*.yaml")
)
# presets that leave the method open (the table code adds fusion=... modulation=...)
OPEN = [p for p in PRESETS if p.split("/")[1] in ("base", "cremad", "kinetics_sounds", "vggsound", "ucf101")]


@functools.cache
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


@pytest.mark.parametrize(
    "preset,expected",
    [
        (
            "cvpr2022/cremad",
            {
                "optim._target_": "torch.optim.SGD",
                "optim.lr": 1e-3,
                "optim.momentum": 0.9,
                "optim.weight_decay": 1e-4,
                "scheduler.step_size": 70,
                "scheduler.gamma": 0.1,
                "trainer.epochs": 100,
                "trainer.batch_size": 64,
                "backbone.name": "resnet18",
                "dataset.num_frames": 1,
                "dataset.image_size": 224,
                "dataset.audio_recipe": "ogm_ge",
            },
        ),
        (
            "cvpr2022/vggsound",
            {
                "optim._target_": "torch.optim.SGD",
                "trainer.batch_size": 64,
                "dataset.num_frames": 3,
                "dataset.audio_crop": 626,
            },
        ),
        (
            "cvpr2022/kinetics_sounds",
            {
                "dataset._target_": "onthefly.data.kinetics_sounds.KineticsSounds",
                "dataset.num_frames": 3,
                "dataset.image_size": 224,
            },
        ),
        (
            "tpami2024/kinetics_sounds",
            {
                "optim._target_": "torch.optim.AdamW",
                "optim.lr": 5e-5,
                "optim.weight_decay": 0.01,
                "scheduler.step_size": 40,
                "trainer.batch_size": 32,
                "trainer.epochs": 100,
                "dataset.image_size": 112,
                "dataset.sampling": "spread",
                "dataset.crop_scale": [0.25, 1.0],
            },
        ),
        (
            "tpami2024/cremad",
            {
                "optim._target_": "torch.optim.AdamW",
                "optim.lr": 1e-3,
                "scheduler.step_size": 20,
                "trainer.batch_size": 32,
            },
        ),
        (
            "tpami2024/ucf101",
            {
                "dataset._target_": "onthefly.data.ucf101.UCF101",
                "backbone.encoders.flow.in_channels": 2,
                "backbone.encoders.flow.width": 64,
            },
        ),
    ],
)
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


@pytest.mark.parametrize("path", sorted((CONF_DIR / "dataset").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_dataset_key_is_in_its_yaml_with_a_comment(path):
    """Every key a user may set is visible where they look: conf/dataset/<name>.yaml lists each field of the
    dataset's schema (a file extending another lists what it changes), each with a comment."""
    text = path.read_text()
    own = OmegaConf.load(path)
    parent = [d for d in own.defaults if isinstance(d, str) and "_schema" not in d]
    keys = [k for k in own if k != "defaults"]
    if not parent:  # a dataset's own file: every schema field is there
        schema = compose([f"dataset={path.stem}"]).dataset
        assert sorted(keys) == sorted(k for k in schema if k != "_target_"), path.name
    for key in keys:
        line = next(line for line in text.splitlines() if line.startswith(f"{key}:"))
        assert "  # " in line, (path.name, line)


def test_dataset_keys_keep_their_types_and_old_command_lines_still_compose():
    cfg = compose(
        [
            "dataset=cremad",
            "dataset.val_fraction=0",
            "dataset.image_size=112",
            "dataset.num_frames=3",
            "dataset.root=/somewhere",
            "dataset.audio_recipe=fbank",
            "dataset.split=speaker",
            "dataset.crop_scale=[0.25,1.0]",
            "dataset.sampling=spread",
        ]
    )
    from hydra.utils import instantiate

    built = instantiate(cfg.dataset)
    assert (built.val_fraction, built.image_size, built.num_frames, str(built.root)) == (0.0, 112, 3, "/somewhere")
    assert (
        built.crop_scale == [0.25, 1.0] and built.sampling.value == "spread" and built.modalities == ["audio", "visual"]
    )
    for bad in ("dataset.val_fration=0.2", "dataset.image_size=big", "dataset.sampling=randomly"):
        with pytest.raises(ConfigCompositionException):
            compose(["dataset=cremad", bad])
    with pytest.raises(ConfigCompositionException):
        compose(["dataset=ucf101", "dataset.audio_recipe=ogm_ge"])  # UCF-101 has no audio option


@pytest.mark.parametrize(
    "dataset, override, message",
    [
        ("cremad", "dataset.val_fraction=1.5", "dataset.val_fraction=1.5: must be in [0, 1)"),
        ("cremad", "dataset.num_frames=0", "dataset.num_frames=0: must be >= 1"),
        ("vggsound", "dataset.audio_crop=0", "dataset.audio_crop=0: must be >= 1"),
        ("ucf101", "dataset.fold=4", "dataset.fold=4: must be in [1, 3]"),
    ],
)
def test_dataset_values_out_of_range_fail_at_compose_time(dataset, override, message):
    from onthefly.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        compose([f"dataset={dataset}", override])
