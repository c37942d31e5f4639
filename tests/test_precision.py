"""The GPU-path options, exercised on the CPU: autocast (bf16, fp16 + GradScaler), OGM on the unscaled gradient,
overflow vs non-finite steps, torch.compile. Their defaults leave CPU results unchanged (the other end-to-end
tests run with them)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from hydra.errors import ConfigCompositionException

from onthefly.config import Precision, compose
from onthefly.engine import build as builder
from onthefly.engine import run as run_module
from onthefly.engine.trainer import Trainer
from onthefly.modulation.ogm import OGM

from conftest import read_metrics, read_results

ONE_EPOCH = ["trainer.epochs=1"]


def _numbers(out):
    metrics = read_metrics(out)
    return metrics.drop(columns=[c for c in metrics.columns if c.startswith("time/")])


@pytest.mark.parametrize("value,member", [("32", "32"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_precision_composes(value, member):
    assert compose([f"trainer.precision={value}"]).trainer.precision is Precision[member]


def test_precision_rejects_an_unknown_value():
    with pytest.raises(ConfigCompositionException):
        compose(["trainer.precision=fp8"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_differs_from_float32(train_run, precision):
    _, full = train_run(*ONE_EPOCH, "modulation=ogm_ge", name="fp32")
    results, mixed = train_run(*ONE_EPOCH, "modulation=ogm_ge", f"trainer.precision={precision}", name=precision)
    assert results["status"] == "ok" and results["nonfinite_steps"] == 0
    steps = pd.read_csv(mixed / "steps.csv")
    assert steps["train/loss"].notna().all()
    # autocast acted: the losses are close to float32's but not the same
    reference = pd.read_csv(full / "steps.csv")["train/loss"]
    assert steps["train/loss"].iloc[0] == pytest.approx(reference.iloc[0], rel=0.05)
    assert not steps["train/loss"].equals(reference)
    assert ("overflow_steps" in results) == (precision == "fp16")


def _first_step_gradient_norms(train_run, monkeypatch, precision: str, name: str) -> dict:
    """Norm of the audio encoder's conv gradients as OGM receives them in the first step."""
    seen = {}
    real = OGM.after_backward

    def spy(self, ctx):
        if "norm" not in seen:
            grads = [p.grad for p in self.params["audio"]]
            seen["norm"] = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
        return real(self, ctx)

    monkeypatch.setattr(OGM, "after_backward", spy)
    train_run(
        *ONE_EPOCH, "modulation=ogm", "trainer.limit_train_batches=1", f"trainer.precision={precision}", name=name
    )
    return seen


def test_ogm_sees_the_unscaled_gradient_under_fp16(train_run, monkeypatch):
    full = _first_step_gradient_norms(train_run, monkeypatch, "32", "fp32")
    real_init = Trainer.__init__

    def moderate_scale(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        # the default 65536 overflows this model's first fp16 step (the scaler then skips it, as it should);
        # 256 does not, so the first step's gradient can be compared with float32's
        self.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    monkeypatch.setattr(Trainer, "__init__", moderate_scale)
    half = _first_step_gradient_norms(train_run, monkeypatch, "fp16", "fp16")
    # the scaler multiplies the loss by 256; unscale_ must have run before OGM's hook
    assert half["norm"] == pytest.approx(full["norm"], rel=0.05), (half, full)


def test_gradient_overflow_is_skipped_by_the_scaler_not_counted_as_nonfinite(train_run, monkeypatch):
    real_init = Trainer.__init__

    def huge_scale(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        # at the default scale (65536) this model's first fp16 backward overflows; the scaler must skip that
        # step and back off (here by 1000x, so that the next steps fit)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=65536.0, backoff_factor=1e-3)

    monkeypatch.setattr(Trainer, "__init__", huge_scale)
    results, out = train_run(*ONE_EPOCH, "modulation=ogm_ge", "trainer.precision=fp16", "trainer.max_nonfinite_steps=0")
    assert results["status"] == "ok"
    assert results["nonfinite_steps"] == 0
    assert 1 <= results["overflow_steps"] < 4, results["overflow_steps"]
    assert read_results(out)["overflow_steps"] == results["overflow_steps"]


def test_nan_loss_under_fp16_is_skipped_and_counted(train_run, monkeypatch):
    import onthefly.tasks as tasks  # the loop's loss comes from the task

    real = tasks.F.cross_entropy
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(tasks.F, "cross_entropy", nan_on_second_call)
    results, out = train_run("modulation=ogm_ge", "trainer.precision=fp16", "trainer.max_nonfinite_steps=1")
    assert results["status"] == "ok" and results["nonfinite_steps"] == 1
    assert pd.read_csv(out / "steps.csv")["train/loss"].isna().sum() == 1


@pytest.mark.slow
def test_compile_keeps_the_numbers_and_the_parameter_names(train_run, monkeypatch):
    built = {}
    real_build = builder.build

    def keep(*args, **kwargs):
        built["parts"] = real_build(*args, **kwargs)
        return built["parts"]

    monkeypatch.setattr(run_module, "build", keep)
    _, plain = train_run(*ONE_EPOCH, "trainer.limit_train_batches=2", name="plain")
    _, compiled = train_run(
        *ONE_EPOCH,
        "trainer.limit_train_batches=2",
        "trainer.compile=true",
        "trainer.compile_backend=eager",
        name="compiled",
    )
    model = built["parts"].model
    assert all(enc._compiled_call_impl is not None for enc in model.encoders.values())
    assert not [k for k in model.state_dict() if "_orig_mod" in k]
    pd.testing.assert_frame_equal(_numbers(plain), _numbers(compiled), check_exact=False, rtol=1e-5)


def test_compile_asks_for_static_shapes(monkeypatch):
    """inductor's dynamic-shape path fails on these encoders at the second batch shape ("cannot determine truth value
    of Relational: 3*s0*s92 < 3", torch 2.11 on an H200 host and 2.14 here, measured with debug=fast
    trainer.compile=true): the encoders are compiled with dynamic=False, one static graph per shape."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    builder.build(compose(["debug=fast", "trainer.compile=true"]), torch.device("cpu"))
    assert len(seen) == 2 and all(kw.get("dynamic") is False for kw in seen)


# --- channels_last: a GPU speed option (oneDNN's AVX-512 NHWC conv backward crashes on some CPU shapes) -------------
def _is_channels_last(model) -> bool:
    # a 3x3 kernel over several channels is NHWC exactly when it is not NCHW-contiguous
    convs = [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)
    ]
    return bool(convs) and all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
    )


def test_channels_last_defaults_to_auto_and_is_off_on_a_cpu(tiny):
    cfg = compose(tiny)
    assert cfg.trainer.channels_last == "auto"
    cpu = torch.device("cpu")
    assert builder.use_channels_last(cfg.trainer.channels_last, cpu) is False
    assert builder.use_channels_last("auto", torch.device("cuda")) is True
    assert builder.use_channels_last("false", torch.device("cuda")) is False
    assert not _is_channels_last(builder.build(cfg, cpu).model)


def test_forcing_channels_last_on_a_cpu_warns_about_the_crash(tiny):
    cfg = compose([*tiny, "trainer.channels_last=true"])
    with pytest.warns(UserWarning, match=r"segmentation fault.*channels_last=auto.*ONEDNN_MAX_CPU_ISA=AVX2"):
        model = builder.build(cfg, torch.device("cpu")).model
    assert _is_channels_last(model)


def test_channels_last_refuses_other_values():
    with pytest.raises(builder.TrainingError, match="auto, true or false"):
        builder.use_channels_last("sometimes", torch.device("cpu"))
