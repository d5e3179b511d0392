"""The few lines a study run ends with: what pretraining bought over each baseline
without it, per model, at the fewest and the most labels, with 95% intervals over
independent replicates and a plain verdict against the better baseline.

    print(results_table(df := collect.load("runs/model_size-local")))
    print(headline(df))
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.collect import PIXELS
from analysis.tables import gain


def verdict(lo: float, hi: float) -> str:
    """What a 95% interval of a gain (points) over the best baseline says."""
    if math.isnan(lo):
        return "one replicate: no interval"
    if lo > 0:
        return "pretraining helps"
    if hi < 0:
        return "a baseline without pretraining is better"
    return "no clear difference"


def _fmt(row: pd.Series) -> str:
    lo, hi = row["_lo"], row["_hi"]
    interval = "" if math.isnan(lo) else f" [{lo:+.1f}, {hi:+.1f}]"
    return f"{row['gain (pp)']:+.1f}{interval}"


def headline(df: pd.DataFrame) -> str:
    """Fine-tuned minus each baseline without pretraining (the tuned supervised network,
    the pixel arm), test top-1 points, for each model at the fewest and the most labels
    of the study, and a verdict against the better of the two (chosen on validation);
    '' without fine-tuning and baseline rows."""
    against = [b for b in ("supervised", "pixels")
               if df.get(f"gain_over_{b}", pd.Series(dtype=float)).notna().any()]
    tables = {b: gain(df, b) for b in against}
    if not tables:
        return ""
    ft = df[df["stage"] == "finetune"]
    labels = ft.groupby("label_fraction")["labels"].median()
    first = next(iter(tables.values()))
    fewest, most = first["label fraction"].min(), first["label fraction"].max()

    def at(lf: float) -> str:
        return f"{100 * lf:g}% labels ({int(labels.get(lf, 0)):,} images)"

    reps = int(min(t["replicates"].min() for t in tables.values()))
    names = {"supervised": "supervised", "pixels": "pixels"}
    lines = [f"what pretraining buys: fine-tuned minus each baseline without pretraining "
             f"(the tuned supervised network; ridge or kNN on the pixels), test top-1 points, "
             f"mean [95% Student-t interval over {reps} independent replicates"
             + ("; with 2 it is +-12.7 standard errors: wide by design" if reps == 2 else "")
             + "]"]
    width = max(len(str(m)) for m in first["model"])
    for lf in sorted({fewest, most}):
        lines.append(f"  at {at(lf)}:")
        for model in first["model"].unique():
            parts = []
            for b, t in tables.items():
                row = t[(t["model"] == model) & (t["label fraction"] == lf)]
                if not row.empty:
                    parts.append(f"vs {names[b]} {_fmt(row.iloc[0])}")
            lines.append(f"    {str(model):<{width}}  " + "   ".join(parts))
    best = gain(df, "best")
    small = best[best["label fraction"] == fewest]
    counts = small.apply(lambda r: verdict(r["_lo"], r["_hi"]), axis=1).value_counts()
    lines.append(f"against the better baseline on validation, at {at(fewest)}: " + ", ".join(
        f"{v} for {n} of {len(small)} models" for v, n in counts.items()))
    return "\n".join(lines)


ROWS = {"finetune": "fine-tuned", "distill": "distilled", "supervised": "supervised",
        "pixels": "pixels"}


def results_table(df: pd.DataFrame) -> str:
    """Test top-1 (%) by model and arm (rows) and label fraction (columns), the mean
    over replicates: the compact table a run ends with (results.csv has every row)."""
    rows = df[df["stage"].isin(list(ROWS)) & df["top1"].notna()].copy()
    if rows.empty:
        return ""
    rows["arm"] = rows["stage"].map(ROWS)
    distilled = rows["stage"] == "distill"  # one row per student: self, or a smaller model
    rows.loc[distilled, "arm"] = ["distilled (self)" if s == "self" else f"distilled to {s}"
                                  for s in rows.loc[distilled, "student"]]
    # Baselines once per model; the pixel arm (no model) once, last.
    models = rows[rows["model"] != PIXELS].groupby("model")["params"].max()
    order = [*models.sort_values(kind="stable").index, PIXELS]
    rows["model"] = pd.Categorical(rows["model"], order, ordered=True)
    arms = ["fine-tuned", *sorted(set(rows.loc[distilled, "arm"])), "supervised", "pixels"]
    rows["arm"] = pd.Categorical(rows["arm"], arms, ordered=True)
    top = rows.pivot_table(index=["model", "arm"], columns="label_fraction", values="top1",
                           aggfunc="mean", observed=True)
    n = rows.groupby(["model", "arm", "label_fraction"], observed=True)["replicate"].nunique()
    labels = rows.groupby("label_fraction")["labels"].median()
    top.columns = [f"{100 * lf:g}% ({int(labels[lf]):,})" for lf in top.columns]
    text = (100 * top).round(1).to_string(na_rep="-")
    reps = f"{n.min()} replicate" if n.min() == n.max() else f"{n.min()}-{n.max()} replicate"
    return (f"test top-1 %, mean over {reps}{'s' if n.max() > 1 else ''} (columns: label "
            "fraction, labelled images):"
            f"\n{text}")
