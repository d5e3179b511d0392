"""A published results table (the SimCLRv2 paper's Table 1, ../shared/data/) read as
a study, so that the report, the figures, the findings and the scaling laws run on it:

    df = load("reference/simclrv2_table1.csv")    # collect.tidy's columns

The CSV has one row per architecture: depth, width, sk (1: selective kernels),
params_m (encoder parameters, millions), finetune_1pct / _10pct / _100pct (fine-tuned
top-1, %, on that share of the labels), linear_eval and supervised (the same
architecture trained on all labels). One run per model: every row is replicate 0
of one seed and one labelled subset, so the findings have no interval and say so.

The supervised network is only given at 100% of the labels, so a gain over a baseline
exists there alone; the pixel arm, the kNN probe and the validation split are absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import collect

REQUIRED = ("depth", "width", "sk", "params_m", "supervised", "linear_eval")
FINETUNE = re.compile(r"^finetune_(\d+(?:\.\d+)?)pct$")
# What a study's results.csv has and a published table does not: present, empty.
ABSENT = ("knn_top1", "knn_val_top1", "linear_val_top1", "pixel_linear_top1",
          "pixel_linear_val_top1", "pixel_knn_top1", "pixel_knn_val_top1", "pixels_top1",
          "pixels_val_top1", "supervised_val_top1", "val_top1", "step", "train_seconds",
          "gpu_hours", "cpu_hours")
IMAGENET_TRAIN = 1_281_167  # ImageNet's training images: the 100% label count
SK_RATIO = 0.0625  # the released SK models' ratio (docs: simclrv2.md)


def is_published(path: str | Path) -> bool:
    """A CSV with the published table's columns (rather than a study's results.csv)."""
    p = Path(path)
    if p.suffix != ".csv" or not p.is_file():
        return False
    head = p.open().readline().strip().split(",")
    return all(c in head for c in REQUIRED) and any(FINETUNE.match(c) for c in head)


def _check(raw: pd.DataFrame, path: str | Path) -> list[tuple[str, float]]:
    missing = [c for c in REQUIRED if c not in raw]
    fractions = [(str(c), float(m.group(1)) / 100) for c in raw.columns
                 if (m := FINETUNE.match(str(c)))]
    if missing or not fractions:
        raise ValueError(f"{path}: columns {', '.join(missing) or 'finetune_<P>pct'} missing; "
                         f"a published table needs {', '.join(REQUIRED)} and at least one "
                         "finetune_<P>pct column (top-1 %, fine-tuned on P% of the labels)")
    for c in [*REQUIRED, *(c for c, _ in fractions)]:
        bad = raw[c][pd.to_numeric(raw[c], errors="coerce").isna()]
        if len(bad):
            raise ValueError(f"{path}: column {c} row {int(bad.index[0]) + 2} is "
                             f"{bad.iloc[0]!r}; allowed: a number")
    for c in ["supervised", "linear_eval", *(c for c, _ in fractions)]:
        out = raw[c][~raw[c].astype(float).between(0, 100)]
        if len(out):
            raise ValueError(f"{path}: column {c} row {int(out.index[0]) + 2} holds "
                             f"{float(out.iloc[0]):g}; allowed: top-1 in % (0..100)")
    return sorted(fractions, key=lambda x: x[1])


def load(path: str | Path, name: str | None = None) -> pd.DataFrame:
    """The published table as collect.tidy's table: a pretrain row (linear
    evaluation), a fine-tune row per label fraction and a supervised row at 100% per
    model; ValueError naming the column, the value and what is allowed."""
    raw = pd.read_csv(path)
    fractions = _check(raw, path)
    study = name or f"{Path(path).stem} (published)"
    protocol = json.dumps({"source": str(Path(path).name), "runs": "one per model, as "
                           "published: no replicates, no validation split, no pixel arm"})
    rows = []
    for _, r in raw.iterrows():
        sk = SK_RATIO if r["sk"] else 0.0
        cell = f"depth={int(r['depth'])},width={r['width']:g},sk={sk:g}"
        base = {"study": study, "seed": 0, "finetune.subset_seed": 0,
                "model.depth": int(r["depth"]), "model.width": float(r["width"]),
                "model.sk_ratio": sk, "head.num_layers": 3, "finetune.head_layer": 1,
                "data.name": "imagefolder", "params": float(r["params_m"]) * 1e6,
                "git_commit": "published", "protocol": protocol, "status": "published"}
        sup = float(r["supervised"]) / 100
        rows.append(base | {"cell": cell, "stage": "pretrain", "stage_key": f"pre:{cell}",
                            "finetune.label_fraction": np.nan, "top1": np.nan,
                            "linear_top1": float(r["linear_eval"]) / 100})
        for col, lf in fractions:
            here = f"{cell},label_fraction={lf:g}"
            full = np.isclose(lf, 1.0)
            common = base | {"cell": here, "finetune.label_fraction": lf,
                             "labelled_examples": round(lf * IMAGENET_TRAIN),
                             "supervised_top1": sup if full else np.nan}
            rows.append(common | {"stage": "finetune", "stage_key": f"ft:{here}",
                                  "top1": float(r[col]) / 100})
            if full:
                rows.append(common | {"stage": "supervised", "stage_key": f"sup:{here}",
                                      "top1": sup})
    table = pd.DataFrame(rows)
    for col in ABSENT:
        table[col] = np.nan
    return collect.tidy(table)
