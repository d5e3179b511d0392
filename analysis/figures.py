"""The report's figures: one function per figure, each taking the tidy table
(analysis/collect.py) and returning a matplotlib Figure; ``figure_set`` says which
of them a study's data can show, each with its caption. Points are means over
replicates; every error bar is the 95% Student-t interval of the mean (none with one
replicate), so one figure reads like the next. Accuracies and errors are drawn in
percent.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: reports are written on headless nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FixedLocator,
    FuncFormatter,
    NullLocator,
    PercentFormatter,
)
from scipy import stats  # noqa: E402

from analysis.curves import GRID, Analysis, Bootstrap, Fit, curve  # noqa: E402
from analysis.laws import covered  # noqa: E402
from analysis.tables import BASELINES, gain, pct  # noqa: E402
from analysis.verdicts import family_note  # noqa: E402

STYLE = {"style": "whitegrid", "context": "paper", "font_scale": 1.1}
MIN_FONT = 9  # points: the smallest text any figure draws (ticks, labels, legends)


def fraction_colors(fractions: Any) -> dict[float, Any]:
    """One colour per label fraction, the same in every figure of a study: a sequential
    palette over the study's fractions, fewest labels darkest."""
    fs = sorted({float(f) for f in fractions if pd.notna(f)})
    return dict(zip(fs, sns.color_palette("viridis", n_colors=max(len(fs), 1)), strict=False))


def model_order(df: pd.DataFrame) -> list[str]:
    """Models from fewest to most parameters: the order of every legend and panel row."""
    rows = df[df["stage"] != "pixels"] if "stage" in df else df
    return [str(m) for m in dict.fromkeys(rows.sort_values("params", kind="stable")["model"])]


def dodge(x: Any, i: int, k: int, log: bool = True, width: float = 0.08) -> np.ndarray:
    """x moved for the i-th of k series sharing it, so their points do not overlap: a
    factor on a log axis, an offset (in x's units) on a linear one."""
    shift = width * (i - (k - 1) / 2)
    x = np.asarray(x, dtype=float)
    return x * np.exp(shift) if log else x + shift


def _replicates(ax: plt.Axes, x: Any, y: Any, color: Any, scale: float = 100) -> None:
    """Every replicate as a faint point: with 3 replicates a mean hides most of it."""
    ax.scatter(x, scale * np.asarray(y, dtype=float), color=color, alpha=0.3, s=10,
               linewidths=0, zorder=1)


def _mean_sd(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    g = df.groupby(by, dropna=False)[value]
    m = g.agg(mean="mean", sd="std", seeds="count").reset_index()
    # The error bar's half-width: the 95% Student-t interval of the mean.
    n = m["seeds"].clip(lower=2)
    m["ci"] = (stats.t.ppf(0.975, n - 1) * m["sd"] / np.sqrt(n)).where(m["seeds"] > 1)
    return m


def t_interval(values: pd.Series) -> tuple[float, float]:
    """(low, high) of the 95% Student-t interval of the mean: seaborn's error bar."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return (float(np.mean(v)), float(np.mean(v))) if len(v) else (np.nan, np.nan)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def _errorbar(ax: plt.Axes, x: pd.Series, m: pd.DataFrame, scale: float = 100, **kw: Any
              ) -> None:
    ax.errorbar(x, scale * m["mean"], yerr=scale * m["ci"].fillna(0), capsize=3, **kw)


MAX_WIDTH_IN = 9.6  # a 960-px page at 96 px an inch: wider figures shrink their text


def wrap(text: str, width: int = 80) -> str:
    """A title or label broken into lines of at most ``width`` characters."""
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def fit_width(fig: Figure, max_in: float = MAX_WIDTH_IN) -> Figure:
    """Narrow the canvas until the figure as saved (tight box: legends and labels
    outside the axes included) is at most ``max_in`` wide. The text keeps its size
    and the axes give way, so on a page the text still reads at its point size."""
    for _ in range(4):
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        tight = fig.get_tightbbox(renderer).width
        if tight <= max_in:
            break
        w, h = fig.get_size_inches()
        fig.set_size_inches(max(w - (tight - max_in) - 0.05, 2.0), h)
        engine = fig.get_layout_engine()
        if engine is None:
            fig.tight_layout()
        else:
            engine.execute(fig)
    return fig


def _finish(fig: Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str,
            legend: dict[str, Any] | None, percent: float | None = 100) -> Figure:
    """Log-scaled x (parameters or labels), a percent y axis (values in [0, percent]),
    labels, title and a legend outside the data, on the right."""
    if percent is not None:  # whole percents: 84%, not 84.00%
        ax.yaxis.set_major_formatter(PercentFormatter(percent, decimals=0))
    if ax.get_xscale() != "log":  # _millions set its own ticks with the scale
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(wrap(title, 70), fontsize="medium")
    if legend is not None:
        ax.legend(**({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "fontsize": MIN_FONT,
                      "borderaxespad": 0} | legend))
    fig.tight_layout()
    return fig


def _millions(ax: plt.Axes, values: pd.Series | np.ndarray) -> None:
    """A log x axis of parameters in millions with plain ticks (0.05, 0.1, 0.2, ...)
    at 1-2-5 steps, as the paper's Figure 1; at most about 6 of them."""
    lo, hi = float(np.min(values)), float(np.max(values))
    ax.set_xscale("log")
    ax.set_xlim(lo / 1.5, hi * 1.5)
    ticks = [m * 10.0 ** e for e in range(-4, 4) for m in (1, 2, 5)
             if lo / 1.5 <= m * 10.0 ** e <= hi * 1.5]
    while len(ticks) > 6:
        ticks = ticks[::2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("encoder parameters (millions, log scale)")


def size_title(stage: str, m: pd.DataFrame, names: pd.Series, pixels: dict[float, float]
               ) -> str:
    """Figure 1's title, from the means it draws (descriptive: the findings table
    alone says what is decided). Per label fraction the model with the highest mean,
    or the models tied at it (equal to 0.1 point); the fractions where the pixel arm's
    mean lies above every model's."""
    parts = []
    for lf, g in m.groupby("label_fraction"):
        top = round(100 * float(g["mean"].max()), 1)
        tied = [str(names[p]) for p in g.loc[(100 * g["mean"]).round(1) == top, "params"]]
        parts.append(f"{' and '.join(tied)} at {pct(float(lf))}")  # type: ignore[arg-type]
    title = f"Top-1 after {stage} against encoder size; highest mean: " + "; ".join(parts)
    above = [pct(float(lf)) for lf, g in m.groupby("label_fraction")  # type: ignore[arg-type]
             if lf in pixels and pixels[lf] > 100 * float(g["mean"].max())]  # type: ignore[index]
    if above:
        title += f"\nthe pixel arm (dotted) is above every model at {', '.join(above)}"
    return title


def top1_vs_params(df: pd.DataFrame, stage: str = "finetune") -> Figure:
    """Paper Figure 1 (left): top-1 against parameters (millions, log), a line per
    label fraction; selective-kernel models as squares on dashed lines; the pixel
    arm dotted. The title names the highest mean per fraction (size_title)."""
    sns.set_theme(**STYLE)
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = df[df["stage"] == stage].assign(params=lambda d: d["params"] / 1e6)
    m = _mean_sd(rows, ["label_fraction", "sk", "params"], "top1")
    colors = fraction_colors(df["label_fraction"])
    for lf, part in rows.groupby("label_fraction"):
        _replicates(ax, part["params"], part["top1"], colors[float(str(lf))])
    for lf, part in m.groupby("label_fraction"):
        for sk_key, sub in part.groupby("sk"):
            sk = float(sk_key)  # type: ignore[arg-type]
            _errorbar(ax, sub["params"], sub, color=colors[float(str(lf))],
                      marker="s" if sk > 0 else "o",
                      linestyle="--" if sk > 0 else "-",
                      label=None if sk > 0 else f"{pct(float(lf))}")  # type: ignore[arg-type]
    # The pixel arm on the same labels, a dotted line per fraction in its colour:
    # what no network at all reaches.
    px = df[df["stage"] == "pixels"].drop_duplicates("stage_key")
    pixels = {float(lf): 100 * float(part["top1"].mean())
              for lf, part in px.groupby("label_fraction")}
    for lf, level in pixels.items():
        if lf in colors:
            ax.axhline(level, color=colors[lf], linestyle=":", linewidth=1.2)
    names = rows.drop_duplicates("params").set_index("params")["model"]
    if not m.empty:
        _millions(ax, m["params"])
        # Each model named once, under its point on the x axis's inside edge.
        for params, name in names.items():
            ax.annotate(str(name), (float(params), 0), xycoords=("data", "axes fraction"),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=MIN_FONT)
    handles = [*ax.get_legend_handles_labels()[0],
               plt.Line2D([], [], color="grey", linestyle=":", label="pixels, no network")]
    if (m["sk"] > 0).any():
        handles.append(plt.Line2D([], [], color="grey", marker="s", linestyle="--",
                                  label="selective kernels"))
    title = size_title(stage, m, names, pixels) if not m.empty else f"Top-1 after {stage}"
    return _finish(fig, ax, "encoder parameters (millions, log scale)",
                   f"top-1 accuracy after {stage}", title,
                   {"handles": handles, "title": "label fraction"})


def relative_improvement(df: pd.DataFrame) -> Figure:
    """Paper Figure 1 (right) as small multiples: a panel per label fraction, the
    relative improvement over the smallest model (percent) against parameters,
    fine-tuned (solid) and supervised (dashed)."""
    sns.set_theme(**STYLE)
    rows = df[df["stage"].isin(["finetune", "supervised"])].assign(
        params=lambda d: d["params"] / 1e6)
    fractions = sorted(rows["label_fraction"].dropna().unique()) or [np.nan]
    cols = min(len(fractions), 3)
    nrows = -(-len(fractions) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols + 1.6, 2.9 * nrows),
                             squeeze=False, sharey=True)
    gains = []
    for ax, lf in zip(axes.flat, fractions, strict=False):
        for stage, style, color in (("finetune", "-", "tab:blue"),
                                    ("supervised", "--", "tab:orange")):
            m = _mean_sd(rows[(rows["stage"] == stage) & (rows["label_fraction"] == lf)],
                         ["params"], "relative_improvement")
            if m.empty:
                continue
            _errorbar(ax, m["params"], m, color=color, marker="o", linestyle=style,
                      label="fine-tuned" if stage == "finetune" else "supervised")
            if stage == "finetune":
                gains.append((lf, 100 * float(m.sort_values("params")["mean"].iloc[-1])))
        ax.axhline(0, color="grey", linewidth=0.8)
        if len(rows):
            _millions(ax, rows["params"])
        ax.set_title(f"{pct(float(lf))} labels", fontsize=MIN_FONT)
        ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=None))
        ax.set_xlabel("parameters (M, log)")
    for ax in axes.flat[len(fractions):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("relative improvement\nover the smallest model")
    # Every panel's series once: a table may have the supervised network at some
    # fractions only (the paper's Table 1: at 100%).
    named: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            named.setdefault(label, handle)
    handles, labels = list(named.values()), list(named)
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=MIN_FONT)
    title = "Relative improvement of the largest model over the smallest"
    if len(gains) > 1:
        (few, g_few), (many, g_many) = gains[0], gains[-1]
        title += (f": {g_few:+.1f}% at {pct(float(few))} labels, {g_many:+.1f}% at "
                  f"{pct(float(many))}")
    fig.suptitle(wrap(title), fontsize="medium")
    fig.tight_layout()
    return fig


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
        ax.set_ylabel("top-1")
        ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=None))
        ax.set_title(f"{pct(lf)} labels")
        ax.legend(fontsize=MIN_FONT)
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
    if dist["unlabelled"].nunique() > 1:
        dist["kind"] = dist["kind"] + " on " + dist["unlabelled"].astype(str)
    both = pd.concat([ft, dist], ignore_index=True)
    both["group"] = both["model"] + "\n" + both["label_fraction"].map(pct) + " labels"
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * both["group"].nunique() + 3), 4))
    top1 = 100 * both["top1"]
    sns.barplot(both.assign(top1_pct=top1), x="group", y="top1_pct", hue="kind",
                errorbar=t_interval, ax=ax)
    for bars in ax.containers:
        if isinstance(bars, BarContainer):
            ax.bar_label(bars, fmt="%.1f", fontsize=MIN_FONT, padding=2)
    # Not from 0: the differences between teacher and student are a few points.
    if len(top1.dropna()):
        ax.set_ylim(max(0.0, top1.min() - 8), min(100.0, top1.max() + 4))
    ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=None))
    ax.set_xlabel("teacher model, label fraction")
    ax.set_ylabel("top-1 (axis not from 0)")
    ax.set_title("Distillation on unlabelled data")
    ax.tick_params(axis="x", labelsize=MIN_FONT)
    ax.legend(title="model", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=MIN_FONT)
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
    means = _mean_sd(rows, ["model", "stage", "labels"], "error")
    series = [(mo, st) for mo in models for st in ("finetune", "supervised")
              if ((means["model"] == mo) & (means["stage"] == st)).any()]
    for i, (model, stage) in enumerate(series):
        m = means[(means["model"] == model) & (means["stage"] == stage)]
        ft = stage == "finetune"
        x = dodge(m["labels"], i, len(series), width=0.05)
        part = rows[(rows["model"] == model) & (rows["stage"] == stage)]
        _replicates(ax, dodge(part["labels"], i, len(series), width=0.05), part["error"],
                    palette[model], scale=1)
        ax.errorbar(x, m["mean"], yerr=m["ci"].fillna(0), fmt="o" if ft else "s",
                    color=palette[model], mfc=None if ft else "white", capsize=3,
                    label=f"{model} {'fine-tuned' if ft else 'supervised'}")
        f = fits.get((model, stage))
        if f is not None:  # solid (dashed) over the measured labels, dotted beyond them
            inside = (grid >= m["labels"].min()) & (grid <= m["labels"].max())
            pred = curve(f).predict(grid)
            ax.plot(grid[inside], pred[inside], color=palette[model],
                    linestyle="-" if ft else "--")
            for side in (grid < m["labels"].min(), grid > m["labels"].max()):
                ax.plot(grid[side], pred[side], color=palette[model], linestyle=":",
                        linewidth=1)
        if bands and (model, stage) in bands:
            low, up = bands[(model, stage)]
            ax.fill_between(grid, low, up, color=palette[model], alpha=0.15, linewidth=0)
    # The pixel arm, the baseline that needs no network: its error at each count.
    px = df[(df["stage"] == "pixels") & df["labels"].notna()].drop_duplicates("stage_key")
    if not px.empty:
        pm = _mean_sd(px.assign(model="pixels"), ["labels"], "error")
        ax.errorbar(pm["labels"], pm["mean"], yerr=pm["ci"].fillna(0), fmt="D:",
                    color="black", mfc="white", capsize=3, label="pixel arm (no network)")
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(PercentFormatter(1.0, decimals=None))
    return _finish(fig, ax, "labelled examples", "test error",
                   "Label efficiency (dotted: extrapolated)", {"fontsize": MIN_FONT}, 1.0)


def gain_figure(df: pd.DataFrame, against: str = "best") -> Figure:
    """Fine-tuned minus a baseline's top-1 against label fraction, a line per model
    (default: the better baseline without pretraining on validation, pixels included),
    with raw 95% intervals. The title describes the means; verdicts are the findings
    table's (one policy: a raw interval is never one)."""
    sns.set_theme(**STYLE)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    t = gain(df, against)
    k = t["model"].nunique() if len(t) else 0
    for i, (model, g) in enumerate(t.groupby("model", sort=False)):
        g = g.sort_values("label fraction")
        err = np.vstack([g["gain (pp)"] - g["_lo"], g["_hi"] - g["gain (pp)"]])
        ax.errorbar(dodge(g["label fraction"], i, k), g["gain (pp)"],
                    yerr=np.nan_to_num(err), capsize=3, marker="o", label=str(model))
    ax.axhline(0, color="grey", linewidth=0.8)
    higher = int((t["gain (pp)"] > 0).sum()) if len(t) else 0
    _finish(fig, ax, "labelled fraction of the training set (log scale)",
            "fine-tuned minus baseline,\ntop-1 percentage points",
            f"Fine-tuned minus {BASELINES[against][0].split(' (')[0]}: the fine-tuned mean is "
            f"higher at {higher} of {len(t)} (model, fraction) pairs",
            {"title": "model"}, percent=None)
    ax.title.set_fontsize(MIN_FONT + 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))  # after the log scale
    return fig


def training_curves(history: pd.DataFrame) -> Figure:
    """Small multiples of the training loss against each stage's own steps: a row per
    stage, a column per model, a colour per run in the panel (label fraction, and the
    LR where the run was one of a grid), a line per replicate. history: stage, model,
    run, step, loss, and optionally replicate."""
    sns.set_theme(**STYLE)
    stages = list(dict.fromkeys(history["stage"]))
    models = ((model_order(history) if "params" in history else
               list(dict.fromkeys(history["model"]))) if "model" in history else [""])
    # Colour: the run's label fraction, as in every other figure; line style: its LR.
    by_fraction = "label_fraction" in history
    colors = fraction_colors(history["label_fraction"]) if by_fraction else {}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(len(stages), len(models), squeeze=False,
                             figsize=(2.9 * len(models) + 1.5, 2.3 * len(stages)))
    for i, stage in enumerate(stages):
        for j, model in enumerate(models):
            ax = axes[i][j]
            part = history[(history["stage"] == stage)
                           & ((history["model"] == model) if "model" in history else True)]
            palette = sns.color_palette(n_colors=max(part["run"].nunique(), 1))
            seen: dict[float, int] = {}
            for n, (run, g) in enumerate(part.groupby("run", sort=False)):
                lf = g["label_fraction"].iloc[0] if by_fraction else np.nan
                if pd.notna(lf):  # the fraction's colour; a style per LR within it
                    color, k = colors[float(lf)], seen.get(float(lf), 0)
                    seen[float(lf)] = k + 1
                else:  # pretraining: no labels
                    color, k = ("black" if by_fraction else palette[n]), 0
                by = g.groupby("replicate", sort=False) if "replicate" in g else [(0, g)]
                for r, (_, line) in enumerate(by):
                    ax.plot(line["step"], line["loss"], color=color, linewidth=1,
                            linestyle=styles[k % len(styles)],
                            label=str(run) if r == 0 else None)
            if i == 0:
                ax.set_title(str(model), fontsize=MIN_FONT)
            if j == 0:
                ax.set_ylabel(f"{stage}\nloss", fontsize=MIN_FONT)
            if i == len(stages) - 1:
                ax.set_xlabel("step", fontsize=MIN_FONT)
            ax.tick_params(labelsize=MIN_FONT)
            if part["run"].nunique() > 1 and j == len(models) - 1:
                ax.legend(fontsize=MIN_FONT, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                          borderaxespad=0)
    fig.suptitle("Training loss of every distinct stage run", fontsize="medium")
    fig.tight_layout()
    return fig


VERDICT_COLORS = {"reproduced": "tab:green", "reversed": "tab:red",
                  "not decided": "tab:grey"}


def predicted_vs_measured(held: pd.DataFrame, fractions: Mapping[float, float]) -> Figure:
    """Each model held out in turn (analysis.laws.held_out): its predicted top-1 with
    the 95% prediction interval (open diamonds) beside its measured top-1 (filled),
    against parameters, a panel per label count (``fractions``: labels -> fraction)."""
    sns.set_theme(**STYLE)
    counts = sorted(held["labels"].unique())
    fig, axes = plt.subplots(1, len(counts), figsize=(3.3 * len(counts) + 1.6, 3.2),
                             squeeze=False)
    colors = fraction_colors(fractions.values())
    for ax, n in zip(axes[0], counts, strict=True):
        h = held[held["labels"] == n]
        lf = float(fractions.get(float(n), np.nan))
        color = colors.get(lf, "tab:blue")
        ok = h["predicted"].notna()
        x = h["params_m"].to_numpy(float)
        ax.errorbar(dodge(x[ok], 1, 2), h.loc[ok, "predicted"],
                    yerr=[h.loc[ok, "predicted"] - h.loc[ok, "low"],
                          h.loc[ok, "high"] - h.loc[ok, "predicted"]],
                    fmt="D", mfc="white", color=color, capsize=3, label="predicted, 95% interval")
        ax.plot(dodge(x, 0, 2), h["measured"], "o", color="black", label="measured")
        _millions(ax, x)
        ax.set_title(f"{pct(lf)} labels" if np.isfinite(lf) else f"{n:,.0f} labels",
                     fontsize=MIN_FONT)
        ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
        ax.set_xlabel("parameters (M, log)")
    axes[0][0].set_ylabel("top-1, model held out")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=MIN_FONT)
    inside, total = covered(held)
    fig.suptitle(wrap(f"Each model predicted from the others: {inside} of {total} measured "
                      f"points inside their 95% intervals, median |miss| "
                      f"{held['miss'].abs().median():.2f} points"), fontsize="medium")
    fig.tight_layout()
    return fig


def _verdict_kind(verdict: str) -> str:
    """'not decided (80% power needs 1.2 pp; ...)' -> 'not decided' (the legend's entry)."""
    return verdict.split(" (")[0]


def findings_caption(found: pd.DataFrame) -> str:
    """The findings figure's caption, from the table it draws: the replicates, the
    t they put in front of the standard error, and the family the verdicts used."""
    n = sorted({int(v) for v in found["replicates"] if v >= 2})
    if n:
        t = stats.t.ppf(0.975, n[0] - 1)
        reps = (f"{n[0]} replicates" if len(n) == 1 else f"{n[0]}-{n[-1]} replicates")
        width = (f" With {reps} an interval spans +-{t:.1f} standard errors"
                 + (" at the fewest" if len(n) > 1 else "") + ".")
    else:
        width = " One replicate: no intervals and no verdicts."
    return ("The paper's findings this study measures (analysis.findings): each "
            "comparison's paired effect, the mean over independent replicates with its "
            "95% Student-t interval." + width + " Verdicts from a t-test of each effect "
            "against 0: green reproduced (the paper's side of 0), red reversed, grey not "
            "decided (the table gives the effect 80% power would need); "
            + family_note(found) + ".")


def findings_figure(table: pd.DataFrame) -> Figure:
    """The paper's findings as measured (analysis.findings' table): each comparison's
    effect in points with its 95% interval, coloured by verdict, a row each."""
    sns.set_theme(**STYLE)
    t = table.iloc[::-1].reset_index(drop=True)  # the first finding on top
    fig, ax = plt.subplots(figsize=(9.5, 0.45 * len(t) + 1.6))
    for i, r in t.iterrows():
        lo, hi = r["_lo"], r["_hi"]
        mean = r["effect"]  # rounded: may sit a hair outside a near-zero-width interval
        err = [[0], [0]] if np.isnan(lo) else [[max(0, mean - lo)], [max(0, hi - mean)]]
        ax.errorbar(mean, i, xerr=err, fmt="o", capsize=3,
                    color=VERDICT_COLORS.get(_verdict_kind(str(r["verdict"])), "black"))
    # The study names a row only where several studies share a comparison's wording.
    shared = (t.duplicated(["finding", "comparison"], keep=False) if "study" in t
              else pd.Series(False, index=t.index))
    ax.set_yticks(range(len(t)), [wrap(f"{r['finding']}{'*' if r.get('role') == 'primary' else ''}"
                                       f"  {r['comparison']}"
                                       + (f"  ({r['study']})" if shared[i] else ""), 60)
                                  for i, r in t.iterrows()], fontsize=MIN_FONT)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_ylabel("finding: comparison")
    ax.set_xlabel("effect: top-1 percentage points (P, F1-F3); % of the smallest model's "
                  "top-1 (F4)\n95% Student-t interval over replicates; verdicts Holm-adjusted "
                  "within their family (* primary, pre-registered)")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=v)
               for v, c in VERDICT_COLORS.items()
               if (t["verdict"].astype(str).map(_verdict_kind) == v).any()]
    ax.legend(handles=handles, fontsize=MIN_FONT, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.set_title("The paper's findings at this scale (above 0: the paper's direction)")
    fig.tight_layout()
    return fig


Drawn = tuple[Callable[[], Figure], str]  # the figure, and its caption


def _over(df: pd.DataFrame) -> str:
    seeds = df["replicate"].nunique()
    if seeds > 1:
        return f"over {seeds} replicates (error bars: 95% Student-t intervals of the mean)"
    if "status" in df and bool((df["status"] == "published").all()):
        return "one published run per model: no error bars"
    return "one replicate: no error bars (run with --replicates 3 or more for intervals)"


def figure_set(df: pd.DataFrame, a: Analysis, history: pd.DataFrame | None = None,
               found: pd.DataFrame | None = None, held: pd.DataFrame | None = None
               ) -> dict[str, Drawn]:
    """The figures this study's data can show, each with its caption."""
    stages = set(df["stage"])
    over = _over(df)
    out: dict[str, Drawn] = {}
    if "finetune" in stages:
        sk = ("; squares and dashed lines: selective-kernel models"
              if (df.loc[df["stage"] == "finetune", "sk"] > 0).any() else "")
        out["top1_vs_params"] = (lambda: top1_vs_params(df), (
            "Test top-1 after fine-tuning against encoder parameters (log scale). A line per "
            "label fraction; points are each model's mean " + over + sk + "; dotted "
            "lines: the pixel arm (ridge or kNN on the same labelled pixels, no network) at "
            "each fraction. The title describes means; what is decided is the findings "
            "table's."))
        if df["gain_over_supervised"].notna().any():
            out["gain"] = (lambda: gain_figure(df), (
                "The study's key number: test top-1 of the fine-tuned model minus that of the "
                "better baseline without pretraining on validation (the tuned supervised "
                "network or the pixel arm) on the same labels, in percentage points, against "
                "the labelled fraction. A line per model; error bars: 95% Student-t "
                "intervals of the mean over independent replicates (none with one). Above "
                "0: the fine-tuned mean is higher; the findings table says what is "
                "decided."))
        if df["params"].nunique() > 1:
            out["relative_improvement"] = (lambda: relative_improvement(df), (
                "Top-1 relative to the smallest model at the same stage, label fraction and "
                "replicate, minus 1, against parameters: fine-tuned (solid) and supervised "
                "(dashed), a panel per label fraction; means " + over + "."))
        if df["head_depth"].nunique() > 1 or df["ft_layer"].nunique() > 1:
            out["head_depth"] = (lambda: head_depth(df), (
                "Test top-1 after fine-tuning from each projection-head layer (0: the "
                "encoder's output), a line per head depth, a panel per label fraction; "
                "means " + over + "."))
    if "distill" in stages:
        out["distillation"] = (lambda: distillation(df), (
            "Test top-1 of each fine-tuned teacher and of its students distilled on "
            "unlabelled images, per teacher model and label fraction; bars are means "
            + over.replace("error bars", "black lines") + ". The axis does not start at 0; "
            "each bar is labelled with its value."))
    if df["labels"].notna().any() and stages & {"finetune", "supervised"}:
        lab = df["labels"].dropna()
        grid = np.geomspace(lab.min() / 2, lab.max() * 2, GRID)
        bands = {k: f.band(grid) for k, f in a.fits.items() if isinstance(f, Bootstrap)}
        fitted = ("Curves: the fitted form (the appendix's fit table below), solid "
                  "(supervised: dashed) over the measured label counts and dotted where "
                  "extrapolated; bands: 95% bootstrap over replicates." if a.fits else
                  "No curves: a form is fitted only to more label counts than it has "
                  "parameters (>= 3 here).")
        out["label_efficiency"] = (lambda: label_efficiency(df, a.fits, bands), (
            "Test error against labelled examples (log-log): fine-tuned (filled circles) "
            "and supervised (open squares), a colour per model, means " + over + ". "
            + fitted))
    if held is not None and held["predicted"].notna().any():
        ft = df[df["stage"] == "finetune"]
        fractions = dict(zip(ft["labels"].astype(float), ft["label_fraction"], strict=True))
        out["predicted_vs_measured"] = (lambda: predicted_vs_measured(held, fractions), (
            "Each model held out in turn: the scaling law chosen on the other models (by "
            "their own held-out error) predicts its fine-tuned top-1 (open diamonds, with "
            "the 95% prediction interval: the law's out-of-sample spread plus the fit's "
            "spread over resampled replicates), beside the measured mean (filled). A "
            "panel per label fraction; the section 'Which law' gives the errors."))
    if found is not None and not found.empty:
        out["findings"] = (lambda: findings_figure(found), findings_caption(found))
    if history is not None and not history.empty:
        out["training_curves"] = (lambda: training_curves(history), (
            "Training loss against each stage's own steps: a row per stage, a column per "
            "model, a line per distinct stage run (its label fraction, and its LR where it "
            "was one run of an LR grid chosen on validation). Pretraining: NT-Xent; "
            "fine-tuning and supervised: cross-entropy; distillation: cross-entropy to the "
            "teacher."))
    return out
