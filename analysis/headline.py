"""The few lines a study run ends with: what pretraining bought, per model, at the
fewest and the most labels, with 95% intervals over replicates and a plain verdict.

    print(headline(collect.load("runs/model_size-local")))
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.figures import gain


def verdict(lo: float, hi: float) -> str:
    """What a 95% interval of a gain (points) says."""
    if math.isnan(lo):
        return "one replicate: no interval"
    if lo > 0:
        return "pretraining helps"
    if hi < 0:
        return "supervised is better"
    return "no clear difference"


def _fmt(row: pd.Series) -> str:
    lo, hi = row["_lo"], row["_hi"]
    interval = "" if math.isnan(lo) else f" [{lo:+.1f}, {hi:+.1f}]"
    return f"{row['gain (pp)']:+.1f}{interval}"


def headline(df: pd.DataFrame) -> str:
    """Fine-tuned minus tuned-supervised test top-1 (points) for each model at the
    fewest and the most labels of the study; '' without fine-tuning and supervised rows."""
    t = gain(df)
    if t.empty:
        return ""
    ft = df[df["stage"] == "finetune"]
    labels = ft.groupby("label_fraction")["labels"].median()
    fewest, most = t["label fraction"].min(), t["label fraction"].max()

    def at(lf: float) -> str:
        return f"{100 * lf:g}% labels ({int(labels.get(lf, 0)):,} images)"

    reps = int(t["seeds"].min())
    lines = [f"what pretraining buys: fine-tuned minus the tuned supervised baseline, test "
             f"top-1 points, mean [95% Student-t interval over {reps} replicates"
             + ("; with 2 it is +-12.7 standard errors: wide by design" if reps == 2 else "")
             + "]"]
    width = max(len(str(m)) for m in t["model"])
    for model, g in t.groupby("model", sort=False):
        first = g[g["label fraction"] == fewest]
        last = g[g["label fraction"] == most]
        parts = [f"{at(fewest)}: {_fmt(first.iloc[0])}" if not first.empty else ""]
        if most != fewest and not last.empty:
            parts.append(f"{at(most)}: {_fmt(last.iloc[0])}")
        lines.append(f"  {str(model):<{width}}  " + "   ".join(p for p in parts if p))
    small = t[t["label fraction"] == fewest]
    counts = small.apply(lambda r: verdict(r["_lo"], r["_hi"]), axis=1).value_counts()
    lines.append(f"at {at(fewest)}: " + ", ".join(
        f"{v} for {n} of {len(small)} models" for v, n in counts.items()))
    return "\n".join(lines)
