"""The few lines a study run ends with: what pretraining bought over each baseline
without it, per model, at the fewest and the most labels, with raw 95% intervals over
independent replicates, and the verdicts of the findings table (analysis.findings:
Holm-adjusted; an interval alone is never a verdict).

    print(results_table(df := collect.load("runs/model_size-local")))
    print(headline(df, findings([df], primaries)))
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from analysis.collect import PIXELS
from analysis.tables import gain
from analysis.verdicts import family_note


def _fmt(row: pd.Series) -> str:
    lo, hi = row["_lo"], row["_hi"]
    interval = "" if math.isnan(lo) else f" [{lo:+.1f}, {hi:+.1f}]"
    return f"{row['gain (pp)']:+.1f}{interval}"


def verdict_lines(found: pd.DataFrame, names: tuple[str, ...]) -> list[str]:
    """The findings table's rows of the findings ``names``, in its order, each
    'comparison: verdict (role)', word for word (the one verdict policy)."""
    rows = found[found["finding"].isin(names)] if not found.empty else found
    return [f"{r['comparison']}: {r['verdict']} ({r['role']})" for _, r in rows.iterrows()]


def headline(df: pd.DataFrame, found: pd.DataFrame | None = None) -> str:
    """Fine-tuned minus each baseline without pretraining (the tuned supervised network,
    the pixel arm), test top-1 points, for each model at the fewest and the most labels
    of the study, with raw intervals; then the verdicts of P (against the better
    baseline on validation) and F1 from the findings table ``found`` (default: the
    study's findings with nothing pre-registered); '' without fine-tuning and
    baseline rows."""
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
    wide = (f"; with {reps} it is +-{stats.t.ppf(0.975, reps - 1):.1f} standard errors"
            if 2 <= reps <= 5 else "")
    lines = [f"what pretraining buys: fine-tuned minus each baseline without pretraining "
             f"(the tuned supervised network; ridge or kNN on the pixels), test top-1 points, "
             f"mean [raw 95% Student-t interval over {reps} independent replicates{wide}]"]
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
    if found is None:
        from analysis.findings import findings  # findings builds on this package's tables

        found = findings([df])
    verdicts = verdict_lines(found, ("P", "F1"))
    if verdicts:
        lines.append(f"verdicts, the findings table's ({family_note(found)}):")
        lines += [f"  {v}" for v in verdicts]
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
