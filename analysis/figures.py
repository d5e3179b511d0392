"""The report's figures: one function per figure, each taking the tidy table
(analysis/collect.py) and returning a matplotlib Figure. Points are means over
seeds; error bars their standard deviation where there are several seeds (the
gain figure: 95% Student-t intervals). Accuracies and errors are drawn in percent.
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
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from analysis import replicates  # noqa: E402
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


def _label_models(ax: plt.Axes, m: pd.DataFrame, names: dict[float, str], y: str = "mean",
                  scale: float = 100) -> None:
    """Name each model beside its point (``m``: one row per model, x in 'params')."""
    for params, value in zip(m["params"], m[y], strict=True):
        ax.annotate(names.get(float(params), ""), (params, scale * value),
                    textcoords="offset points", xytext=(4, 6), fontsize=7)


def _finish(fig: Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str,
            legend: dict[str, Any], percent: float | None = 100) -> Figure:
    """Log-scaled x (parameters or labels), a percent y axis (values in [0, percent]),
    labels, title and legend."""
    if percent is not None:
        ax.yaxis.set_major_formatter(PercentFormatter(percent, decimals=None))
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
    if not m.empty:  # name the models once, on the line with the most labels
        _label_models(ax, m[m["label_fraction"] == m["label_fraction"].max()], _names(rows))
    # The pixel arm on the same labels, a dotted line per fraction in its colour:
    # what no network at all reaches.
    px = df[df["stage"] == "pixels"].drop_duplicates("stage_key")
    colors = dict(zip(sorted(m["label_fraction"].unique()), palette, strict=False))
    for lf, part in px.groupby("label_fraction"):
        if lf in colors:
            ax.axhline(100 * part["top1"].mean(), color=colors[lf], linestyle=":",
                       linewidth=1.2, label=f"{_pct(float(lf))}: pixels, no network")
    return _finish(fig, ax, "encoder parameters", f"top-1 accuracy after {stage}",
                   "Top-1 vs model size", {"title": "label fraction"})


def _names(df: pd.DataFrame) -> dict[float, str]:
    return {float(p): str(m) for p, m in zip(df["params"], df["model"], strict=True)}


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
        if stage == "finetune" and not m.empty:
            _label_models(ax, m[m["label_fraction"] == m["label_fraction"].min()],
                          _names(df))
    ax.axhline(0, color="grey", linewidth=0.8)
    return _finish(fig, ax, "encoder parameters",
                   "relative improvement over the smallest model",
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
        ax.set_ylabel("top-1")
        ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=None))
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
    if dist["unlabelled"].nunique() > 1:
        dist["kind"] = dist["kind"] + " on " + dist["unlabelled"].astype(str)
    both = pd.concat([ft, dist], ignore_index=True)
    both["group"] = both["model"] + ", " + both["label_fraction"].map(_pct) + " labels"
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * both["group"].nunique() + 3), 4))
    pct = 100 * both["top1"]
    sns.barplot(both.assign(top1_pct=pct), x="group", y="top1_pct", hue="kind",
                errorbar="sd", ax=ax)
    for bars in ax.containers:
        if isinstance(bars, BarContainer):
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    # Not from 0: the differences between teacher and student are a few points.
    if len(pct.dropna()):
        ax.set_ylim(max(0.0, pct.min() - 8), min(100.0, pct.max() + 4))
    ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=None))
    ax.set_xlabel("teacher model, label fraction")
    ax.set_ylabel("top-1 (axis not from 0)")
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
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(PercentFormatter(1.0, decimals=None))
    return _finish(fig, ax, "labelled examples", "test error",
                   "Label efficiency (dotted: extrapolated)", {"fontsize": "small"}, 1.0)


def _cell(values: pd.Series) -> str:
    """'mean' (one seed) or 'mean ± sd' over seeds, in percent."""
    v = 100 * values.dropna()
    if v.empty:
        return "-"
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std():.1f}"


MODEL_KEYS = ["depth", "width", "sk", "params"]
PIXELS_ROW = "raw pixels (no network)"


def table1(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 for this study: a row per model (its name says depth, width
    and SK; parameters in millions, without the head), smallest first; top-1 (%)
    after fine-tuning and of the supervised baseline at every label fraction, after
    distillation (self) at every fraction, and the linear and kNN probes.
    'mean ± sd' over seeds where there are several."""
    models = df[df["stage"] == "pretrain"].drop_duplicates(MODEL_KEYS)[MODEL_KEYS]
    if models.empty:
        models = df[df["stage"] != "pixels"].drop_duplicates(MODEL_KEYS)[MODEL_KEYS]
    models = models.sort_values("params", ignore_index=True)
    out = pd.DataFrame({
        "model": [model_name(d, w, k) for d, w, k in
                  zip(models["depth"], models["width"], models["sk"], strict=True)],
        "params (M)": [f"{p / 1e6:.2f}" for p in models["params"]]})
    fractions = sorted(df["label_fraction"].dropna().unique())

    def column(rows: pd.DataFrame, value: str) -> list[str]:
        return [_cell(rows[np.logical_and.reduce([rows[k] == v for k, v in
                                                  zip(MODEL_KEYS, m, strict=True)])][value])
                for m in models[MODEL_KEYS].itertuples(index=False)]

    for stage, name in (("finetune", "fine-tune"), ("supervised", "supervised"),
                        ("distill", "distilled")):
        rows = df[df["stage"] == stage]
        if stage == "distill":
            rows = rows[rows["student"] == "self"]
        for lf in fractions if not rows.empty else []:
            out[f"{name} {_pct(lf)}"] = column(rows[rows["label_fraction"] == lf], "top1")
    pre = df[df["stage"] == "pretrain"].drop_duplicates("stage_key")
    out["linear"] = column(pre, "linear_top1")
    out["kNN"] = column(pre, "knn_top1")
    px = df[df["stage"] == "pixels"].drop_duplicates("stage_key")  # shared by every model
    has_probe = pre.get("pixel_linear_top1", pd.Series(dtype=float)).notna().any()
    if has_probe or not px.empty:
        # Raw pixels: the pixel arm on each fraction's labels (in the supervised columns:
        # a baseline without pretraining) and the probes on every training label.
        ref: dict[str, Any] = {c: "-" for c in out.columns} | {"model": PIXELS_ROW}
        ref |= {"params (M)": "0"}
        for lf in fractions:
            if f"supervised {_pct(lf)}" in ref:
                ref[f"supervised {_pct(lf)}"] = _cell(px[px["label_fraction"] == lf]["top1"])
        if has_probe:
            ref |= {"linear": _cell(pre["pixel_linear_top1"].iloc[:1]),
                    "kNN": _cell(pre["pixel_knn_top1"].iloc[:1])}
        out = pd.concat([out, pd.DataFrame([ref])], ignore_index=True)
    return out


# What a gain is measured against: the baseline's name, the stages it compares.
BASELINES = {"supervised": ("the tuned supervised baseline", ("finetune", "supervised")),
             "pixels": ("the pixel arm", ("finetune", "pixels")),
             "best": ("the best baseline without pretraining (chosen on validation)",
                      ("finetune", "supervised", "pixels"))}


def _interval_text(lo: float, hi: float) -> str:
    return "n/a (one replicate)" if np.isnan(lo) else f"[{100 * lo:.2f}, {100 * hi:.2f}]"


def gain(df: pd.DataFrame, against: str = "supervised") -> pd.DataFrame:
    """The study's key number: fine-tuned minus a baseline's top-1 (percentage points)
    per model and label fraction, paired within a cell (same labels and seed): mean
    and 95% Student-t interval over independent replicates (values that share a stage
    run count once, analysis.replicates). ``against``: a key of BASELINES. Where the
    head or the fine-tuning layer varies, each is its own line ('R18 1/16x, head 3
    from layer 1')."""
    rows = []
    column = f"gain_over_{against}"
    ft = df[(df["stage"] == "finetune") & df[column].notna()]
    shared = replicates.links(df, ft, BASELINES[against][1])
    heads = ft["head_depth"].nunique() > 1 or ft["ft_layer"].nunique() > 1
    keys = ["model", "params", "head_depth", "ft_layer", "label_fraction"]
    for (model, params, hd, layer, lf), g in ft.groupby(keys, sort=False):
        mean, lo, hi, n = replicates.effect(g[column].to_numpy(), list(shared[g.index]))
        name = f"{model}, head {hd} from layer {layer}" if heads else model
        rows.append({"model": name, "params": int(params), "label fraction": lf,
                     "gain (pp)": round(100 * mean, 2),
                     "95% interval (pp)": _interval_text(lo, hi), "replicates": n,
                     "_lo": 100 * lo, "_hi": 100 * hi})
    if not rows:
        return pd.DataFrame(rows)
    return pd.DataFrame(rows).sort_values(["params", "model", "label fraction"],
                                          ignore_index=True)


def distill_gap(df: pd.DataFrame) -> pd.DataFrame:
    """Distilled student minus its teacher, test top-1 (points), per teacher model,
    label fraction, student and unlabelled set: mean and 95% Student-t interval over
    independent replicates (the paper: a student matches or beats its teacher)."""
    rows = []
    dist = df[(df["stage"] == "distill") & df["top1"].notna() & df["teacher_top1"].notna()]
    keys = ["model", "label_fraction", "student", "unlabelled"]
    for (model, lf, student, unl), g in dist.groupby(keys, sort=False):
        mean, lo, hi, n = replicates.effect((g["top1"] - g["teacher_top1"]).to_numpy(),
                                            list(g["runs"]))
        rows.append({"teacher": model, "label fraction": lf, "student": student,
                     "unlabelled": unl, "student minus teacher (pp)": round(100 * mean, 2),
                     "95% interval (pp)": _interval_text(lo, hi), "replicates": n})
    return pd.DataFrame(rows)


def gain_figure(df: pd.DataFrame, against: str = "best") -> Figure:
    """Fine-tuned minus a baseline's top-1 against label fraction, a line per model
    (default: the better baseline without pretraining on validation, pixels included)."""
    sns.set_theme(**STYLE)
    fig, ax = plt.subplots(figsize=(6, 4))
    t = gain(df, against)
    for i, (model, g) in enumerate(t.groupby("model", sort=False)):
        g = g.sort_values("label fraction")
        err = np.vstack([g["gain (pp)"] - g["_lo"], g["_hi"] - g["gain (pp)"]])
        ax.errorbar(g["label fraction"], g["gain (pp)"],
                    yerr=np.nan_to_num(err), capsize=3, marker="o", label=str(model))
        last = g.iloc[-1]
        ax.annotate(str(model), (last["label fraction"], last["gain (pp)"]),
                    textcoords="offset points", xytext=(4, 4 - 9 * i), fontsize=7)
    ax.axhline(0, color="grey", linewidth=0.8)
    _finish(fig, ax, "labelled fraction of the training set",
            "fine-tuned minus baseline top-1 (points)",
            f"What pretraining buys over {BASELINES[against][0]}", {"fontsize": "small"},
            percent=None)
    ax.title.set_fontsize("small")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))  # after the log scale
    return fig


def training_curves(history: pd.DataFrame) -> Figure:
    """Each stage's loss against its own steps (history: stage, run, step, loss)."""
    sns.set_theme(**STYLE)
    stages = list(dict.fromkeys(history["stage"]))
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        for run, g in history[history["stage"] == stage].groupby("run", sort=False):
            ax.plot(g["step"], g["loss"], label=str(run), linewidth=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


VERDICT_COLORS = {"reproduced": "tab:green", "reversed": "tab:red",
                  "not resolved": "tab:grey"}


def _verdict_kind(verdict: str) -> str:
    """'not resolved (detectable: 1.2 pp)' -> 'not resolved' (the legend's entry)."""
    return verdict.split(" (")[0]


def findings_figure(table: pd.DataFrame) -> Figure:
    """The paper's findings as measured (analysis.findings' table): each comparison's
    effect in points with its 95% interval, coloured by verdict, a row each."""
    sns.set_theme(**STYLE)
    t = table.iloc[::-1].reset_index(drop=True)  # the first finding on top
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(t) + 1.2))
    for i, r in t.iterrows():
        lo, hi = r["_lo"], r["_hi"]
        mean = r["effect (pp)"]  # rounded: may sit a hair outside a near-zero-width interval
        err = [[0], [0]] if np.isnan(lo) else [[max(0, mean - lo)], [max(0, hi - mean)]]
        ax.errorbar(mean, i, xerr=err, fmt="o", capsize=3,
                    color=VERDICT_COLORS.get(_verdict_kind(str(r["verdict"])), "black"))
    # The study names a row only where several studies share a comparison's wording.
    several = "study" in t and t["study"].nunique() > 1
    ax.set_yticks(range(len(t)), [f"{r['finding']}  {r['comparison']}"
                                  + (f"  ({r['study']})" if several else "")
                                  for _, r in t.iterrows()], fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("effect, top-1 percentage points (95% Student-t interval over replicates;"
                  " verdicts Holm-adjusted)")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=v)
               for v, c in VERDICT_COLORS.items()
               if (t["verdict"].astype(str).map(_verdict_kind) == v).any()]
    ax.legend(handles=handles, fontsize="small", loc="best")
    ax.set_title("The paper's findings at this scale (above 0: the paper's direction)")
    fig.tight_layout()
    return fig
