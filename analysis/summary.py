"""What a report opens with: the data and budgets, the headline, every finding the
study can speak to with its verdict, and warnings about the results themselves
(a pixel baseline that beats every encoder, too few replicates, missing stages).
Pure functions of the tidy table (analysis/collect.py).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis.tables import pct
from scaling.catalog import CATALOG


def data_and_budgets(df: pd.DataFrame) -> list[str]:
    """Lines: the dataset and its sizes; each stage's budget as it ran."""
    name = str(df["data.name"].iloc[0])
    pre = df[df["stage"] == "pretrain"]
    protocol = json.loads(pre["protocol"].dropna().iloc[0]) if pre["protocol"].notna().any() \
        else {}
    size = df.get("data.image_size", pd.Series(dtype=float)).dropna()
    sizes = [CATALOG[name].title if name in CATALOG else name]
    if protocol.get("images"):
        sizes.append(f"{int(protocol['images']):,} training images")
    if protocol.get("val_size"):
        sizes.append(f"{int(protocol['val_size']):,} held out for validation")
    if len(size):
        sizes.append(f"inputs at {int(size.iloc[0])} px")
    line = ", ".join(sizes)
    if "finetune" in set(df["stage"]):
        labels = df[df["stage"] == "finetune"].groupby("label_fraction")["labels"].median()
        line += "; labelled subsets: " + ", ".join(
            f"{pct(float(lf))} ({int(n):,} images)" for lf, n in labels.items())
    lines = [line]
    budget = []
    for stage, what in (("pretrain", "pretraining"), ("finetune", "fine-tuning"),
                        ("supervised", "supervised baseline"), ("distill", "distillation")):
        rows = df[(df["stage"] == stage) & df.get("step", pd.Series(np.nan, df.index)).notna()]
        if rows.empty:
            continue
        by = rows.groupby(rows["label_fraction"].fillna(-1))
        steps, labels = by["step"].median(), by["labels"].median()
        batch = rows.get(f"{stage}.batch_size", pd.Series(dtype=float)).dropna()
        parts = []
        for lf, s in steps.items():
            n, b = labels.get(lf), (float(batch.iloc[0]) if len(batch) else np.nan)
            # As run: a labelled subset smaller than a batch is one (smaller) batch an
            # epoch, so min_steps can mean many more epochs than the config's.
            configured = rows.get(f"{stage}.epochs", pd.Series(dtype=float)).dropna().unique()
            epochs = (f" ({s / max(n // min(b, n), 1):.3g} epochs)"
                      if lf >= 0 and np.isfinite(b) and pd.notna(n) and n > 0 else
                      f" ({int(configured[0])} epochs)" if lf < 0 and len(configured) == 1
                      else "")
            parts.append(f"{int(s):,} steps" + (f" at {pct(lf)}" if lf >= 0 else "") + epochs)
        budget.append(f"{what} " + ", ".join(parts))
    if budget:
        lines.append("budgets: " + "; ".join(budget))
    reps = int(df["replicate"].nunique())
    lines.append(f"{reps} independent replicate{'s' if reps > 1 else ''} per cell")
    return lines


def warnings(df: pd.DataFrame, missing: list[str]) -> list[str]:
    """What a reader must know before trusting the numbers."""
    out = []
    ft = df[(df["stage"] == "finetune") & df["top1"].notna()]
    px = df[(df["stage"] == "pixels") & df["top1"].notna()].drop_duplicates("stage_key")
    for lf in sorted(set(ft["label_fraction"]) & set(px["label_fraction"])):
        best = ft[ft["label_fraction"] == lf].groupby("model")["top1"].mean()
        pixels = px[px["label_fraction"] == lf]["top1"].mean()
        if pixels > best.max():
            out.append(f"at {pct(lf)} labels the pixel arm ({100 * pixels:.1f}) beats every "
                       f"fine-tuned model (best {best.idxmax()}: {100 * best.max():.1f}): at "
                       "these budgets the encoders add nothing over the raw pixels")
    pre = df[(df["stage"] == "pretrain") & df["linear_top1"].notna()]
    if len(pre) and "pixel_linear_top1" in pre and pre["pixel_linear_top1"].notna().any():
        probe = pre.groupby("model")["linear_top1"].mean()
        pixel = float(pre["pixel_linear_top1"].dropna().iloc[0])
        if pixel > probe.max():
            out.append(f"the linear probe on raw pixels ({100 * pixel:.1f}) beats every "
                       f"pretrained encoder's (best {probe.idxmax()}: {100 * probe.max():.1f}): "
                       "the encoders are under-trained")
    reps = int(df["replicate"].nunique())
    if reps == 1:
        out.append("one run per model, as published: no intervals and no verdicts"
                   if "status" in df and bool((df["status"] == "published").all()) else
                   "one replicate: no intervals and no verdicts (run with --replicates 3)")
    elif reps == 2:
        out.append("n = 2 replicates: a 95% interval is +-12.7 standard errors, so only "
                   "large, consistent effects resolve")
    if missing:
        out.append(f"a partial sweep: {len(missing)} stage results are missing (appendix)")
    return out


def findings_lines(found: pd.DataFrame) -> list[str]:
    """One line per finding row: its role, what it compares, the effect with its raw
    interval and the verdict, word for word the findings table's."""
    if found.empty:
        return []
    out = []
    for _, r in found.iterrows():
        effect = float(r["effect"])
        shown = "n/a" if not np.isfinite(effect) else f"{effect:+.2f} {r['unit']}"
        out.append(f"{r['finding']} ({r['role']}): {r['comparison']}: {shown} "
                   f"{r['95% interval']} (n = {r['replicates']}): {r['verdict']}")
    return out

