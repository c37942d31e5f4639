"""PNG figures (matplotlib, headless): training curves of ρ / k / q, robustness curves, probe bars."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# what each logged per-step quantity is, for titles and axis labels
QUANTITIES = {"rho": "ρ (discrepancy ratio)", "k": "k (OGM gradient coefficient)", "q": "q (OPM drop probability)"}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_plot(
    series: dict,
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    hline: Optional[float] = None,
    integer_x: Optional[bool] = None,
) -> Path:
    """series: {label: (x, y)} or {label: (x, y, y_std)} (a shaded band of ±std). ``integer_x``: ticks at whole
    numbers only (default: when the x axis is epochs or steps)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if integer_x if integer_x is not None else xlabel.split()[0] in ("epoch", "step"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for label, values in series.items():
        x, y = values[0], values[1]
        (line,) = ax.plot(x, y, label=label, marker="o" if len(x) <= 12 else None, ms=3)
        if len(values) > 2 and values[2] is not None:
            y, s = pd.Series(list(y)), pd.Series(list(values[2]))
            ax.fill_between(x, y - s, y + s, alpha=0.2, color=line.get_color())
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def step_curves(steps: pd.DataFrame, prefix: str, path: Path, title: str = "", smooth: int = 10) -> Path:
    """Per-step curves of every `train/<prefix>_<modality>` column, each a rolling mean over ``smooth`` steps
    (the default title says so)."""
    cols = [c for c in steps.columns if c.startswith(f"train/{prefix}_")]
    series = {c.split("_", 1)[1]: (steps["step"], steps[c].rolling(smooth, min_periods=1).mean()) for c in cols}
    what = QUANTITIES.get(prefix, prefix)
    title = title or f"{what} of each modality, rolling mean over {smooth} training steps"
    return line_plot(
        series,
        path,
        xlabel="training step",
        ylabel=f"{what}, rolling mean",
        title=title,
        hline=1.0 if prefix == "rho" else None,
    )


def grouped_bars(
    table: pd.DataFrame, path: Path, ylabel: str, title: str = "", errors: Optional[pd.DataFrame] = None
) -> Path:
    """Bars for a table (rows: groups on the x axis, columns: bars within a group)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(table) + 2), 4.2))
    table.plot.bar(ax=ax, yerr=errors, capsize=3, rot=20)
    plt.setp(ax.get_xticklabels(), ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title, xlabel="")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def run_plots(run_dir: Path, prefixes: Sequence[str] = ("rho", "k", "q")) -> list[Path]:
    """ρ / k / q curves of one run from its steps.csv (those it logged)."""
    run_dir = Path(run_dir)
    path = run_dir / "steps.csv"
    if not path.exists():
        return []
    steps = pd.read_csv(path)
    out = []
    for prefix in prefixes:
        if any(c.startswith(f"train/{prefix}_") for c in steps.columns):
            out.append(step_curves(steps, prefix, run_dir / "plots" / f"{prefix}.png"))
    return out
