"""Summaries -> Markdown, LaTeX and CSV tables, a report-ready PNG, and the spec's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from onthefly.tables.spec import TableSpec


def _fmt(mean: float, std: float, n: int) -> str:
    if not n or mean != mean:
        return ""
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _key_label(key: str) -> str:
    return key.split("/", 1)[1] if key.startswith("test/") else key


def wide_table(spec: TableSpec, summary: pd.DataFrame) -> pd.DataFrame:
    """Rows = the spec's rows; per column × value key: ours (mean ± std), and paper + Δ where the spec has
    published numbers. A cell that holds fewer seeds than asked for says so, ``(n=2)``; a cell with missing seeds
    (failed, running, not run, no data) carries a note marker ``[k]``, and ``df.attrs["notes"]`` holds the notes in
    marker order (one note per distinct reason). "–": no value at all; "n/a": a key the row does not have (e.g. a
    uni-modal model's other probe)."""
    has_pub = bool(len(summary)) and summary["published"].notna().any()
    keys = spec.all_value_keys()
    notes: list[str] = []
    table = {}
    for row in spec.rows:
        line = {}
        for col in spec.columns:
            cells = summary[(summary["row"] == row.id) & (summary["col"] == col.id)].set_index("key")
            for key in keys:
                name = f"{col.label or col.id} {_key_label(key)}"
                if key not in cells.index:
                    line[name] = "n/a"
                    if has_pub:
                        line[f"{name} (paper)"], line[f"{name} Δ"] = "", ""
                    continue
                c = cells.loc[key]
                text = _fmt(c["mean"], c["std"], c["n"]) or "–"
                expected = c.get("expected", c["n"])
                if c["n"] and expected == expected and c["n"] < expected:
                    text += f" (n={int(c['n'])})"
                reason = c.get("reason")
                if isinstance(reason, str) and reason:
                    if reason not in notes:
                        notes.append(reason)
                    text += f" [{notes.index(reason) + 1}]"
                line[name] = text
                if has_pub:
                    pub, d = c["published"], c["delta"]
                    line[f"{name} (paper)"] = "" if pub is None or pub != pub else f"{pub:.1f}"
                    line[f"{name} Δ"] = "" if d is None or d != d else f"{d:+.1f}"
        table[row.label or row.id] = line
    df = pd.DataFrame.from_dict(table, orient="index")
    df.index.name = "row"
    df.attrs["notes"] = notes
    return df


def notes_lines(df: pd.DataFrame) -> list[str]:
    """The table's notes as ``[k] reason`` lines."""
    return [f"[{i}] {note}" for i, note in enumerate(df.attrs.get("notes", []), 1)]


def to_markdown(df: pd.DataFrame) -> str:
    header = [df.index.name or "", *df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(i), *(str(v) for v in r)]) + " |" for i, r in df.iterrows()]
    notes = notes_lines(df)
    return "\n".join(lines + ([""] + [f"{n}  " for n in notes] if notes else []))


_LATEX = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "×": r"$\times$",
    "–": "--",
    "…": r"\ldots{}",
}


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    esc = lambda s: "".join(_LATEX.get(ch, ch) for ch in str(s))  # noqa: E731
    cols = "l" + "c" * len(df.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{esc(caption)}}}",
        rf"\label{{tab:{label}}}",
        rf"\begin{{tabular}}{{{cols}}}",
        r"\toprule",
        " & ".join([esc(df.index.name or "")] + [esc(c) for c in df.columns]) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join([esc(i)] + [esc(v) for v in r]) + r" \\" for i, r in df.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = notes_lines(df)
    if notes:
        lines += [r"\par\smallskip\footnotesize"] + [esc(n) + r"\\" for n in notes]
    lines += [r"\end{table}"]
    return "\n".join(lines)


def table_png(spec: TableSpec, summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """Bars of ours (± std) per row for each column × key, published numbers as black ticks."""
    from onthefly.plots import _save, plt

    groups = summary.groupby(["col", "key"], sort=False)
    if not len(summary) or summary["n"].sum() == 0:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4, 3.2 * len(groups)), 3.8), squeeze=False)
    for ax, ((col, key), g) in zip(axes[0], groups):
        labels = [next((r.label or r.id) for r in spec.rows if r.id == rid) for rid in g["row"]]
        x = range(len(g))
        ax.bar(x, g["mean"].fillna(0), yerr=g["std"].fillna(0), capsize=3, color="#4C72B0")
        pub = g["published"].astype(float)
        ax.scatter(
            [i for i, p in zip(x, pub) if p == p],
            [p for p in pub if p == p],
            marker="_",
            s=300,
            color="black",
            label="paper",
            zorder=3,
        )
        ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{col} {_key_label(key)}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if pub.notna().any():
            ax.legend(fontsize=7)
    fig.suptitle(spec.heading, fontsize=9)
    return _save(fig, path)


def spec_plots(spec: TableSpec, records: pd.DataFrame, out: Path) -> list[Path]:
    """The figures the spec asks for, from local run folders: curves per row (mean over seeds), robustness
    curves and probe bars."""
    from onthefly.plots import QUANTITIES, grouped_bars, line_plot

    paths = []
    if not len(records) or "run_dir" not in records:
        return paths
    local = records[~records["run_dir"].astype(str).str.startswith("wandb:")]
    labels = {r.id: r.label or r.id for r in spec.rows}
    for col, by_col in local.groupby("col", sort=False):
        histories = {}
        for rid, g in by_col.groupby("row", sort=False):
            frames = [pd.read_csv(Path(d) / "metrics.csv") for d in g["run_dir"] if (Path(d) / "metrics.csv").exists()]
            frames = [f[f["train/loss"].notna()] for f in frames if "train/loss" in f]  # epoch rows, not the test row
            if frames:
                histories[labels[rid]] = pd.concat(frames).groupby("epoch")
        for plot in spec.plots:
            if plot in ("rho", "k", "q", "acc_curves"):
                prefix = {"acc_curves": "val/acc_"}.get(plot, f"train/{plot}_")
                series = {}
                for label, hist in histories.items():
                    mean = hist.mean(numeric_only=True)
                    std = hist.std(ddof=0, numeric_only=True)
                    for c in [c for c in mean.columns if c.startswith(prefix)]:
                        series[
                            f"{label}: {c.split('_', 1)[1]}" if plot != "acc_curves" else f"{label}: {c[len(prefix) :]}"
                        ] = (mean.index, mean[c].values, std[c].values)
                if series:
                    if plot == "acc_curves":
                        ylabel, what = "val accuracy", "per-modality val accuracy"
                    else:
                        ylabel = f"{QUANTITIES.get(plot, plot)}, epoch mean"
                        what = f"{QUANTITIES.get(plot, plot)}: epoch mean of the per-step values"
                    paths.append(
                        line_plot(
                            series,
                            out / f"{col}_{plot}.png",
                            "epoch",
                            ylabel,
                            f"{spec.name} · {col} · {what}, mean ± std over seeds",
                            hline=1.0 if plot == "rho" else None,
                        )
                    )
        if "robustness" in spec.plots:
            series = {}
            for rid, g in by_col.groupby("row", sort=False):
                keys = sorted(
                    {k.split("@")[0] for k in g.columns if k.startswith("robustness/") and g[k].notna().any()}
                )
                for k in keys:
                    ratios = sorted(float(c.split("@")[1]) for c in g.columns if c.startswith(k + "@"))
                    vals = [g[f"{k}@{r}"] for r in ratios]
                    series[f"{labels[rid]}: {k.split('acc_')[1]} removed"] = (
                        ratios,
                        [v.mean() for v in vals],
                        [v.std(ddof=0) for v in vals],
                    )
            if series:
                paths.append(
                    line_plot(
                        series,
                        out / f"{col}_robustness.png",
                        "fraction of test samples without the modality",
                        "fused accuracy",
                        f"{spec.name} · {col} · robustness",
                    )
                )
        if "probe" in spec.plots:
            cols = [c for c in by_col.columns if c.startswith("probe/acc_") and by_col[c].notna().any()]
            if cols:
                grouped = by_col.groupby("row", sort=False)[cols]
                mean = grouped.mean().rename(index=labels) * 100
                std = grouped.std(ddof=0).rename(index=labels) * 100
                paths.append(
                    grouped_bars(
                        mean,
                        out / f"{col}_probe.png",
                        "linear-probe test accuracy (%)",
                        f"{spec.name} · {col} · linear probes",
                        errors=std,
                    )
                )
    return paths
