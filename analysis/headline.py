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
from analysis.tables import chosen_baseline, gain
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


def headline(df: pd.DataFrame, found: pd.DataFrame | None = None,
             verdicts_of: tuple[str, ...] = ("P", "F1")) -> str:
    """Fine-tuned minus each baseline without pretraining (the tuned supervised network,
    the pixel arm), test top-1 points, for each model at the fewest and the most labels
    of the study, with raw intervals; then the verdicts of ``verdicts_of`` (P: against
    the better baseline on validation; F1) from the findings table ``found``
    (default: the study's findings with nothing pre-registered); where the bottom line
    follows, it gives P's, and the headline F1's only. '' without fine-tuning and
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
    verdicts = verdict_lines(found, verdicts_of)
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


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def machine_line(invocations: list[dict]) -> str:
    """Where the study ran and how long it took against its first estimate, from the
    sweep's invocations.json; '' without one."""
    if not invocations:
        return ""
    last = invocations[-1]
    gpus = last.get("gpus") or 0
    where = (f"{gpus:g} GPUs" + (f" ({last['gpu_type'].split(':', 1)[1]})"
                                 if last.get("gpu_type") else "")
             if gpus else f"{last.get('cpus') or 0:g} CPU cores (no GPU)")
    where += " of a Ray cluster" if last.get("cluster") else " of one machine"
    seconds = sum(float(i.get("seconds") or 0) for i in invocations)
    runs = len(invocations)
    line = (f"ran on {where}: {_duration(seconds)} of wall clock in {runs} invocation"
            f"{'s' if runs > 1 else ''}")
    first = invocations[0].get("estimate_s")
    if first:
        line += (f", against a first estimate of {_duration(first)} of training steps "
                 "(evaluation and start-up come on top)")
    load = invocations[0].get("load_per_core_at_start")
    if load is not None and load > 0.25:
        line += f"; the machine was busy at the start (load {load:.2f} a core)"
    return line


def bottom_line(df: pd.DataFrame, found: pd.DataFrame, invocations: list[dict] | None = None,
                data: list[str] | None = None) -> str:
    """What a study found in a few lines, for the console's end and the report's top:
    at every label count, what pretraining buys against the best baseline without it
    (the better on validation), with the findings table's verdict (P); the data and
    budgets (``data``: analysis.summary.data_and_budgets); where it ran and how long
    it took against the first estimate."""
    rows = found[found["finding"] == "P"] if not found.empty else found
    if rows.empty:
        return ""
    chose = chosen_baseline(df)
    fractions = {f"{100 * lf:g}%": lf for lf in df["label_fraction"].dropna().unique()}
    names = {"pixels": "the pixel arm", "supervised": "the supervised network",
             "mixed": "the better baseline (per cell)"}
    lines = ["bottom line: fine-tuned minus the best baseline without pretraining (chosen "
             "on validation), test top-1 points, with the findings table's verdict:"]
    for _, r in rows.iterrows():
        model, _, rest = str(r["comparison"]).partition(" at ")
        fraction = rest.split(" labels")[0]
        against = names.get(str(chose.get((model.split(", head")[0], fractions.get(fraction)),
                                          "")), "it")
        lines.append(f"  at {fraction} labels, {model}: {float(r['effect']):+.1f} "
                     f"{r['95% interval']} against {against}: {r['verdict']} ({r['role']})")
    lines += [f"  {line}" for line in (data or [])]
    machine = machine_line(invocations or [])
    if machine:
        lines.append(f"  {machine}")
    compute = compute_line(df)
    if compute:
        lines.append(f"  {compute}")
    return "\n".join(lines)


def compute_line(df: pd.DataFrame) -> str:
    """The training compute of the study's distinct stage runs (each run once, however
    many cells reused it): GPU-hours, or CPU core-hours."""
    runs = df.drop_duplicates("stage_key")
    for column, unit in (("gpu_hours", "GPU-hours"), ("cpu_hours", "CPU core-hours")):
        if column in runs and runs[column].notna().any():
            return (f"training compute: {runs[column].sum():.2f} {unit} over "
                    f"{int(runs[column].notna().sum())} distinct stage runs")
    return ""
