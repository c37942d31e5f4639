"""Console and figure habits: progress bars only on a terminal (one place decides), an evaluation progress bar,
plot titles that say what is plotted, whole-number epoch ticks, aligned robustness columns."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch

from onthefly import progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize(
    "tty,enabled,env,expected",
    [
        (True, True, None, True),
        (False, True, None, False),  # a Slurm log, a joblib worker, a pipe
        (True, False, None, False),  # trainer.progress=false
        (False, True, "1", True),
        (True, True, "0", False),
        (False, False, "1", False),  # the caller's "no" wins over the environment
    ],
)
def test_a_bar_is_drawn_only_on_a_terminal(monkeypatch, tty, enabled, env, expected):
    monkeypatch.setattr("sys.stderr", _Stream(tty))
    if env is None:
        monkeypatch.delenv(progress.ENV, raising=False)
    else:
        monkeypatch.setenv(progress.ENV, env)
    assert progress.shown(enabled) is expected
    bar = progress.bar(range(3), enabled=enabled, desc="x", file=io.StringIO())
    assert bar.disable is (not expected)
    assert list(bar) == [0, 1, 2]  # a silent bar still iterates


def test_a_silent_bar_writes_nothing_to_a_log(monkeypatch):
    log = _Stream(False)
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.delenv(progress.ENV, raising=False)
    for _ in progress.bar(range(50), desc="epoch 0"):
        pass
    assert log.getvalue() == ""


def test_evaluation_draws_a_bar_over_its_batches(monkeypatch):
    from onthefly.engine import evaluation

    seen = []

    def fake_bar(iterable, **kwargs):
        seen.append(kwargs)
        return iterable

    monkeypatch.setattr(evaluation, "progress_bar", fake_bar)

    class Model(torch.nn.Module):
        input_keys = ["x"]

        def encode(self, inputs):
            return {"x": inputs["x"]}

    loader = [{"x": torch.zeros(2, 3), "label": torch.zeros(2, dtype=torch.long)} for _ in range(3)]
    feats, labels = evaluation.extract_features(Model(), loader, torch.device("cpu"), progress=True, desc="val")
    assert feats["x"].shape == (6, 3) and len(labels) == 6
    assert seen == [{"enabled": True, "total": 3, "desc": "val", "unit": "batch", "leave": False}]
    evaluation.extract_features(Model(), loader, torch.device("cpu"), limit=2)
    assert seen[-1]["enabled"] is False and seen[-1]["total"] == 2


def test_step_curves_say_rolling_mean_and_epoch_ticks_are_whole_numbers(tmp_path, monkeypatch):
    from onthefly import plots

    titles, locators = [], []
    real_save = plots._save

    def spy(fig, path):
        ax = fig.axes[0]
        titles.append((ax.get_title(), ax.get_xlabel(), ax.get_ylabel()))
        locators.append(ax.xaxis.get_major_locator())
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    steps = pd.DataFrame(
        {
            "step": range(1, 31),
            "epoch": [i // 10 for i in range(30)],
            "train/rho_audio": [1.5] * 30,
            "train/rho_visual": [0.7] * 30,
        }
    )
    plots.step_curves(steps, "rho", tmp_path / "rho.png", smooth=5)
    title, xlabel, ylabel = titles[-1]
    assert "rolling mean over 5" in title and "ρ" in title and "per step" not in title
    assert xlabel == "training step" and "rolling mean" in ylabel
    plots.line_plot({"a": ([0, 1, 2], [0.1, 0.2, 0.3])}, tmp_path / "e.png", "epoch", "acc")
    ticks = locators[-1].tick_values(0, 2)
    assert all(float(t).is_integer() for t in ticks)
    plots.line_plot({"a": ([0.0, 0.5, 1.0], [0.1, 0.2, 0.3])}, tmp_path / "r.png", "fraction removed", "acc")
    assert not all(float(t).is_integer() for t in locators[-1].tick_values(0, 1))


def test_robustness_columns_line_up_for_long_modality_names():
    from onthefly.analyse import robustness_table

    ratios = [round(0.1 * i, 1) for i in range(11)]
    text = robustness_table({"ratios": ratios, "acc": {"audio": [0.5] * 11, "rgb_diff": [0.61234] * 11}})
    lines = text.splitlines()[1:]
    assert len({len(line) for line in lines}) == 1, lines  # every row as wide as the header
    header, audio, rgb = lines
    for token in ("r=0.0", "r=1.0"):
        end = header.index(token) + len(token)
        assert audio[end - 6 : end].strip() and rgb[end - 6 : end].strip(), token  # a number under each header
    assert rgb.startswith("rgb_diff ") and "0.6123" in rgb
