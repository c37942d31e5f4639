"""Settings that cannot work fail before any work, with one line naming the key, the value and what is allowed.

The ranges are carried by the schemas' types (``Annotated[float, Range(ge=0)]`` in onthefly.config and in the
``__init__`` signatures of configurable classes); one pass, onthefly.config.validate, checks a composed config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, List

import pytest
import torch

from onthefly.config import (
    MAY_CHANGE_ON_RESUME,
    ConfigError,
    PositiveInt,
    Range,
    compose,
    configurable,
    may_change_on_resume,
    problems,
    register_configs,
    validate,
)
from onthefly.engine.errors import TrainingError

from conftest import subprocess_env

register_configs()


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    return str(info.value)


# the bad inputs of issue 11 §2, then one per range of each group
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.batch_size=0"], "trainer.batch_size=0: must be >= 1"),
        (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0: must be >= 1"),
        (["trainer.epochs=0"], "trainer.epochs=0: must be >= 1"),
        (["optim.lr=-1"], "optim.lr=-1.0: must be > 0"),
        (["modulation=ogm", "modulation.alpha=-1"], "modulation.alpha=-1.0: must be >= 0"),
        (["modulation=opm", "modulation.q_base=1.5"], "modulation.q_base=1.5: must be in [0, 1]"),
        (["modulation=opm", "modulation.p_exe=2"], "modulation.p_exe=2.0: must be in [0, 1]"),
        # trainer
        (["trainer.num_workers=-1"], "trainer.num_workers=-1: must be >= 0"),
        (["trainer.threads=0"], "trainer.threads=0: must be >= 1"),
        (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0: must be >= 1"),
        (["trainer.limit_eval_batches=0"], "trainer.limit_eval_batches=0: must be >= 1"),
        (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0: must be >= 1"),
        (["trainer.max_nonfinite_steps=-1"], "trainer.max_nonfinite_steps=-1: must be >= 0"),
        (["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints=-1: must be >= 0"),
        (["trainer.checkpoint_every_n_steps=0"], "trainer.checkpoint_every_n_steps=0: must be >= 1"),
        (["trainer.grad_clip=0"], "trainer.grad_clip=0.0: must be > 0"),
        (["trainer.prefetch_factor=0"], "trainer.prefetch_factor=0: must be >= 1"),
        (["trainer.channels_last=sometimes"], "trainer.channels_last=sometimes: must be one of auto, true, false"),
        (["trainer.device=gpu"], "trainer.device=gpu: must be auto, cpu, cuda or cuda:N"),
        (["seed=-1"], "seed=-1: must be in [0, 4294967295]"),
        # optimizers and schedulers
        (["optim=sgd", "optim.momentum=1"], "optim.momentum=1.0: must be in [0, 1)"),
        (["optim=sgd", "optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be >= 0"),
        (["optim=adamw", "optim.betas=[0.9,1.0]"], "optim.betas[1]=1.0: must be in [0, 1)"),
        (["optim=adam", "optim.eps=0"], "optim.eps=0.0: must be > 0"),
        (["optim.lr=nan"], "optim.lr=nan: must be > 0"),
        (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size=0: must be >= 1"),
        (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma=0.0: must be > 0"),
        (["scheduler=constant", "scheduler.factor=2"], "scheduler.factor=2.0: must be in [0, 1]"),
        # methods (ranges in the classes' signatures)
        (["modulation=ogm", "modulation.ge_scale=-1"], "modulation.ge_scale=-1.0: must be >= 0"),
        (["modulation=ogm", "modulation.warmup_epochs=-1"], "modulation.warmup_epochs=-1: must be >= 0"),
        (["modulation=ogm", "modulation.end=-2"], "modulation.end=-2: must be >= 0"),
        (["modulation=opm", "modulation.lam=-0.5"], "modulation.lam=-0.5: must be >= 0"),
        (["modulation=opm_ogm", "modulation.ogm.alpha=-1"], "modulation.ogm.alpha=-1.0: must be >= 0"),
        (["modulation=opm_ogm", "modulation.opm.q_base=2"], "modulation.opm.q_base=2.0: must be in [0, 1]"),
        (["modulation=modality_dropout", "modulation.p=1.5"], "modulation.p=1.5: must be in [0, 1]"),
        (["modulation=gblending", "modulation.super_epoch=0"], "modulation.super_epoch=0: must be >= 1"),
        # models: the backbone, encoders written inline in it, fusion heads
        (["backbone.width=0"], "backbone.width=0: must be >= 1"),  # not repeated for the encoders that refer to it
        (["backbone.encoders.sensor.hidden=0"], "backbone.encoders.sensor.hidden=0: must be >= 1"),
        (["backbone.encoders.audio.stem=tiny"], "backbone.encoders.audio.stem=tiny: must be one of imagenet, small"),
        (["fusion=mlp", "fusion.dropout=1"], "fusion.dropout=1.0: must be in [0, 1)"),
        (["backbone=transformer", "backbone.encoders.text.heads=0"], "backbone.encoders.text.heads=0: must be >= 1"),
    ],
)
def test_a_value_out_of_range_fails_at_compose_time_naming_key_value_and_range(overrides, message):
    assert _refusal(overrides) == message


def test_every_problem_is_named_on_one_line():
    text = _refusal(["trainer.batch_size=0", "modulation=ogm", "modulation.alpha=-1"])
    assert "\n" not in text
    assert "trainer.batch_size=0: must be >= 1" in text and "modulation.alpha=-1.0: must be >= 0" in text


def test_the_error_is_a_training_error_so_the_command_line_prints_one_line():
    assert issubclass(ConfigError, TrainingError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.threads=null", "trainer.checkpoint_every_n_steps=null", "trainer.keep_checkpoints=0"],
        ["trainer.channels_last=true"],
        ["trainer.channels_last=false"],
        ["trainer.channels_last=True"],
        ["modulation=opm", "modulation.q_base=0", "modulation.p_exe=1", "modulation.lam=0"],
        ["modulation=opm", "modulation.q_base=1", "modulation.p_exe=0"],
        ["modulation=ogm_ge", "modulation.alpha=0", "modulation.ge_scale=0", "modulation.end=null"],
        ["trainer.max_nonfinite_steps=0", "trainer.num_workers=0", "seed=4294967295"],
        ["optim=sgd", "optim.momentum=0", "optim.weight_decay=0"],
        ["trainer.device=cpu"],
        ["trainer.device=auto"],
    ],
)
def test_values_at_the_edges_of_their_ranges_compose(overrides):
    compose(overrides)


def test_channels_last_given_as_a_bool_is_accepted_whatever_its_case():
    # the command line turns `true` into a bool, which the str field stores as "True"
    assert compose(["trainer.channels_last=true"]).trainer.channels_last.lower() == "true"


# --- the environment: a device this machine does not have ---------------------------------------------------------
def test_cuda_without_cuda_fails_at_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        assert _refusal([f"trainer.device={device}"]) == (
            f"trainer.device={device}: CUDA is not available on this machine (torch.cuda.is_available() is False); "
            "use auto or cpu"
        )
    # a config meant for another machine (a cluster job rendered here) is checked without the environment
    assert compose(["trainer.device=cuda"], environment=False).trainer.device == "cuda"


def test_a_cuda_index_past_the_machines_devices_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert (
        _refusal(["trainer.device=cuda:2"])
        == "trainer.device=cuda:2: this machine has 2 CUDA device(s): cuda:0 to cuda:1"
    )
    assert compose(["trainer.device=cuda:1"]).trainer.device == "cuda:1"


# --- one mechanism: annotations on any configurable class, and on configs read back from a run folder ---------------
@configurable("probe")
class _ProbeData:
    """Stands for a dataset whose signature carries ranges (what conf/dataset's classes will carry)."""

    def __init__(
        self,
        root: Annotated[str, MAY_CHANGE_ON_RESUME] = "data/probe",
        num_frames: PositiveInt = 3,
        crop_scale: List[Annotated[float, Range(gt=0, le=1)]] = [0.08, 1.0],  # noqa: B006
        val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.1,
    ):
        pass


_PROBE = f"{_ProbeData.__module__}.{_ProbeData.__qualname__}"


@dataclass
class _ClipOptions:
    num_frames: PositiveInt = 3
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.1


@configurable("probe")
class _ProbeClips:
    """Stands for datasets that share one options object."""

    def __init__(self, clips: _ClipOptions = _ClipOptions(), root: str = "data/clips"):  # noqa: B008
        pass


def test_ranges_in_a_shared_options_dataclass_are_checked():
    target = f"{_ProbeClips.__module__}.{_ProbeClips.__qualname__}"
    assert problems({"dataset": {"_target_": target, "clips": {"num_frames": 0, "val_fraction": 0.5}}}) == [
        "dataset.clips.num_frames=0: must be >= 1"
    ]
    assert _ProbeClips.Config().clips == _ClipOptions()


def test_ranges_in_a_configurable_signature_are_checked_in_a_plain_container():
    # a run folder's config.yaml comes back as plain dicts: the schema is found through `_target_`
    config = {
        "dataset": {"_target_": _PROBE, "root": "x", "num_frames": 0, "crop_scale": [0.0, 1.0], "val_fraction": 1.0},
        "trainer": {"epochs": 0},
    }
    assert problems(config) == [
        "dataset.num_frames=0: must be >= 1",
        "dataset.crop_scale[0]=0.0: must be in (0, 1]",
        "dataset.val_fraction=1.0: must be in [0, 1)",
        "trainer.epochs=0: must be >= 1",
    ]
    with pytest.raises(ConfigError, match=r"^dataset\.num_frames=0: must be >= 1; "):
        validate(config)
    validate({"dataset": {"_target_": _PROBE, "val_fraction": 0.0}})


def test_the_settings_that_may_change_on_resume_come_from_the_schema_flags():
    keys = may_change_on_resume({"dataset": {"_target_": _PROBE, "root": "x", "num_frames": 3}})
    assert "dataset.root" in keys and "dataset.num_frames" not in keys
    from omegaconf import OmegaConf

    composed = OmegaConf.to_container(compose(["modulation=opm_ogm"]), resolve=True, enum_to_str=True)
    free = {k for k in may_change_on_resume(composed) if not k.startswith(("logger.", "paths.", "trainer.imbalance."))}
    assert free == {
        "name",
        "logger",
        "paths",
        "trainer.imbalance",
        "trainer.resume",
        "trainer.progress",
        "trainer.num_workers",
        "trainer.device",
        "trainer.threads",
        "trainer.checkpoint_every_n_steps",
        "trainer.keep_checkpoints",
        "trainer.epochs",
        "trainer.eval_test",
        "trainer.plots",
        "trainer.save_checkpoint",
        "trainer.pin_memory",
        "trainer.prefetch_factor",
        "trainer.compile",
        "trainer.compile_backend",
    }
    assert {f"logger.{k}" for k in composed["logger"]} <= may_change_on_resume(composed)


def test_resume_refuses_only_settings_without_the_flag():
    from omegaconf import OmegaConf

    from onthefly.engine.checkpoint import config_differences

    saved = OmegaConf.to_container(compose(["modulation=ogm"]), resolve=True, enum_to_str=True)
    now = OmegaConf.to_container(
        compose(
            [
                "modulation=ogm",
                "trainer.epochs=30",
                "trainer.device=cpu",
                "logger.tags=[a]",
                "name=again",
                "trainer.batch_size=8",
                "modulation.alpha=0.5",
            ]
        ),
        resolve=True,
        enum_to_str=True,
    )
    assert config_differences(saved, now) == ["modulation.alpha", "trainer.batch_size"]


# --- the command line: one line and a non-zero exit, nothing trained ------------------------------------------
def _train_cli(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "onthefly.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    return proc, run_dir


def _assert_refused_before_any_work(proc: subprocess.CompletedProcess, run_dir: Path, message: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert message in output, output[-3000:]
    assert "Traceback" not in output, "a bad value should be one line, not a traceback"
    made = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert not {"config.yaml", "metrics.csv", "steps.csv", "best.pt"} & set(made), made
    if "results.json" in made:  # a refused job says so in its folder (a sweep reports it as failed)
        record = json.loads((run_dir / "results.json").read_text())
        assert record["status"] == "failed" and message in record["error"] and record["epochs_done"] == 0


@pytest.mark.slow
def test_cli_refuses_a_batch_size_of_zero_in_one_line(tmp_path):
    proc, run_dir = _train_cli(tmp_path, "trainer.batch_size=0", "debug=fast")
    _assert_refused_before_any_work(proc, run_dir, "trainer.batch_size=0: must be >= 1")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_refuses_cuda_on_a_machine_without_it(tmp_path):
    proc, run_dir = _train_cli(tmp_path, "debug=fast", "trainer.device=cuda")
    _assert_refused_before_any_work(proc, run_dir, "trainer.device=cuda: CUDA is not available on this machine")
