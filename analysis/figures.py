"""The report's figures: one function per figure, each taking the tidy table
(analysis/collect.py) and returning a matplotlib Figure. Points are means over
seeds; error bars their standard deviation where there are several seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: reports are written on headless nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.collect import model_name  # noqa: E402
from analysis.fit import Bootstrap, Fit, curve  # noqa: E402

STYLE = {"style": "whitegrid", "context": "paper", "font_scale": 1.1}


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


def _mean_sd(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    g = df.groupby(by, dropna=False)[value]
    return g.agg(mean="mean", sd="std", seeds="count").reset_index()


def _errorbar(ax: plt.Axes, x: pd.Series, m: pd.DataFrame, scale: float = 100, **kw: Any
              ) -> None:
    ax.errorbar(x, scale * m["mean"], yerr=scale * m["sd"].fillna(0), capsize=3, **kw)


def _finish(fig: Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str,
            legend: dict[str, Any]) -> Figure:
    """Log-scaled x (parameters or labels), labels, title and legend."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(**legend)
    fig.tight_layout()
    return fig


def top1_vs_params(df: pd.DataFrame, stage: str = "finetune") -> Figure:
    """Paper Figure 1 (left): top-1 against parameters, a line per label fraction;
    selective-kernel models marked with filled squares, others with circles."""
    sns.set_theme(**STYLE)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = df[df["stage"] == stage]
    m = _mean_sd(rows, ["label_fraction", "sk", "params"], "top1")
    palette = sns.color_palette(n_colors=max(m["label_fraction"].nunique(), 1))
    for color, (lf, part) in zip(palette, m.groupby("label_fraction"), strict=False):
        for sk_key, sub in part.groupby("sk"):
            lf, sk = float(lf), float(sk_key)  # type: ignore[arg-type]
            label = f"{_pct(lf)} labels" + (" (SK)" if sk > 0 else "")
            _errorbar(ax, sub["params"], sub, color=color, marker="s" if sk > 0 else "o",
                      linestyle="--" if sk > 0 else "-", label=label)
    return _finish(fig, ax, "encoder parameters", f"top-1 accuracy after {stage} (%)",
                   "Top-1 vs model size", {"title": "label fraction"})


def relative_improvement(df: pd.DataFrame) -> Figure:
    """Paper Figure 1 (right): improvement over the smallest model, per label
    fraction, fine-tuned (solid) and supervised (dashed)."""
    sns.set_theme(**STYLE)
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = sns.color_palette(n_colors=max(df["label_fraction"].nunique(), 1))
    for stage, style in (("finetune", "-"), ("supervised", "--")):
        m = _mean_sd(df[df["stage"] == stage], ["label_fraction", "params"],
                     "relative_improvement")
        for color, (lf, sub) in zip(palette, m.groupby("label_fraction"), strict=False):
            _errorbar(ax, sub["params"], sub, color=color, marker="o", linestyle=style,
                      label=f"{stage}, {_pct(float(lf))} labels")  # type: ignore[arg-type]
    ax.axhline(0, color="grey", linewidth=0.8)
    return _finish(fig, ax, "encoder parameters",
                   "relative improvement over the smallest model (%)",
                   "Bigger models gain more with fewer labels?", {"fontsize": "small"})


def head_depth(df: pd.DataFrame) -> Figure:
    """The paper's head figure: top-1 after fine-tuning from each head layer, a line
    per head depth, a panel per label fraction."""
    sns.set_theme(**STYLE)
    rows = df[df["stage"] == "finetune"]
    fractions = sorted(rows["label_fraction"].dropna().unique()) or [np.nan]
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.6),
                             squeeze=False, sharey=False)
    for ax, lf in zip(axes[0], fractions, strict=True):
        m = _mean_sd(rows[rows["label_fraction"] == lf], ["head_depth", "ft_layer"], "top1")
        for hd, sub in m.groupby("head_depth"):
            _errorbar(ax, sub["ft_layer"], sub, marker="o", label=f"{hd}-layer head")
        ax.set_xlabel("fine-tuned from head layer")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{_pct(lf)} labels")
        ax.legend(fontsize="small")
    fig.suptitle("Projection-head depth and the layer fine-tuning starts from")
    fig.tight_layout()
    return fig


def distillation(df: pd.DataFrame) -> Figure:
    """Teacher (fine-tuned) vs its distilled students, per label fraction and model."""
    sns.set_theme(**STYLE)
    ft = df[df["stage"] == "finetune"].assign(kind="teacher (fine-tuned)")
    dist = df[df["stage"] == "distill"].copy()
    dist["kind"] = np.where(dist["student"] == "self", "self-distilled",
                            "student " + dist["student"].astype(str))
    both = pd.concat([ft, dist], ignore_index=True)
    both["group"] = both["model"] + ", " + both["label_fraction"].map(_pct) + " labels"
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * both["group"].nunique() + 3), 4))
    sns.barplot(both.assign(top1_pct=100 * both["top1"]), x="group", y="top1_pct", hue="kind",
                errorbar="sd", ax=ax)
    ax.set_xlabel("teacher model, label fraction")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Distillation on unlabelled data")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(title="model")
    fig.tight_layout()
    return fig


def label_efficiency(df: pd.DataFrame, fits: Mapping[tuple[str, str], Fit | Bootstrap],
                     bands: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]] | None = None
                     ) -> Figure:
    """Error against labels (log-log) per model: fine-tuned points with error bars and
    fitted curves with 95% bands; the supervised baseline dashed. ``fits`` maps
    (model, stage) to a fit; ``bands`` to (lower, upper) on a grid of 200 counts."""
    sns.set_theme(**STYLE)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rows = df[df["stage"].isin(["finetune", "supervised"]) & df["labels"].notna()]
    models = list(dict.fromkeys(rows.sort_values("params")["model"]))
    palette = dict(zip(models, sns.color_palette(n_colors=max(len(models), 1)), strict=False))
    lo, hi = rows["labels"].min(), rows["labels"].max()
    grid = np.geomspace(lo / 2, hi * 2, 200) if len(rows) else np.array([1.0])
    for keys, m in _mean_sd(rows, ["model", "stage", "labels"], "error").groupby(
            ["model", "stage"]):
        model, stage = str(keys[0]), str(keys[1])
        ft = stage == "finetune"
        ax.errorbar(m["labels"], m["mean"], yerr=m["sd"].fillna(0), fmt="o" if ft else "s",
                    color=palette[model], mfc=None if ft else "white", capsize=3,
                    label=f"{model} {'fine-tuned' if ft else 'supervised'}")
        f = fits.get((model, stage))
        if f is not None:
            ax.plot(grid, curve(f).predict(grid), color=palette[model],
                    linestyle="-" if ft else "--")
        if bands and (model, stage) in bands:
            low, up = bands[(model, stage)]
            ax.fill_between(grid, low, up, color=palette[model], alpha=0.15, linewidth=0)
    ax.set_yscale("log")
    return _finish(fig, ax, "labelled examples", "test error",
                   "Label efficiency (curves: fitted; bands: 95% over seeds)",
                   {"fontsize": "small"})


def table1(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 analogue: a row per model (depth, width, SK); top-1 (%)
    after fine-tuning on each label fraction, the linear probe, and the supervised
    baseline on the most labels. Means over seeds."""
    ft = df[df["stage"] == "finetune"]
    t = (100 * ft.pivot_table(index=["depth", "width", "sk", "params"],
                              columns="label_fraction", values="top1", aggfunc="mean"))
    t.columns = [f"fine-tune {_pct(c)}" for c in t.columns]
    pre = df[df["stage"] == "pretrain"].drop_duplicates("stage_key")
    t["linear"] = 100 * pre.groupby(["depth", "width", "sk", "params"])["linear_top1"].mean()
    sup = df[df["stage"] == "supervised"]
    if not sup.empty:
        most = sup["label_fraction"].max()
        t[f"supervised {_pct(most)}"] = 100 * sup[sup["label_fraction"] == most].groupby(
            ["depth", "width", "sk", "params"])["top1"].mean()
    t = t.round(1).reset_index()
    t.insert(0, "model", [model_name(d, w, k)
                          for d, w, k in zip(t["depth"], t["width"], t["sk"], strict=True)])
    return t


def table1_figure(df: pd.DataFrame) -> Figure:
    sns.set_theme(**STYLE)
    t = table1(df)
    fig, ax = plt.subplots(figsize=(1.3 * len(t.columns) + 1, 0.4 * len(t) + 1.2))
    ax.axis("off")
    cells = t.astype(object).where(t.notna(), "-").astype(str).to_numpy()
    table = ax.table(cellText=cells, colLabels=list(t.columns), loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    ax.set_title("Top-1 (%) by model: fine-tuned, linear probe, supervised")
    fig.tight_layout()
    return fig
