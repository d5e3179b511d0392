"""A study's results as one tidy table, for finished and interrupted sweeps alike.

    df = load("runs/model_size-local")      # or "s3://bucket/studies/model_size-cifar10-gpu"

One row per (cell, stage). A cell fixes the model, the label fraction and the seed,
so this is one row per (cell, stage, label fraction, seed). The rows come from the
study's ``cells/*.json`` (written as each stage finishes, so an interrupted sweep
loses nothing), else from ``results.csv``. Columns: every column of results.csv
(docs/studies.md) plus ``DERIVED`` (docs/analysis.md).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from analysis import replicates
from scaling import storage
from scaling.catalog import CATALOG
from scaling.stages.registry import ORDER
from scaling.storage import Location
from scaling.study import results

DERIVED = {
    "label_fraction": "fraction of the training labels the stage saw (pretraining: NaN)",
    "seed": "the run's seed",
    "subset_seed": "which labelled subset (finetune.subset_seed; pretraining: that of its cell)",
    "replicate": "one number per (seed, subset_seed) pair: what intervals are taken over",
    "depth": "ResNet depth", "width": "width multiplier", "sk": "selective-kernel ratio (0: none)",
    "head_depth": "projection-head layers", "ft_layer": "head layer fine-tuning starts from",
    "model": "a readable model name, e.g. 'R18 1/16x +SK'",
    "student": "distillation rows: 'self' (the teacher's architecture) or the student model",
    "unlabelled": "distillation rows: the unlabelled set distilled on (default: the training set)",
    "classes": "number of classes (the random-guess error is 1 - 1/classes)",
    "labels": "labelled examples the stage used",
    "error": "1 - top1",
    "relative_improvement": "top1 / top1 of the smallest model (fewest parameters) at the "
                            "same stage, label fraction, head and seed, minus 1",
    "gain_over_supervised": "top1 - supervised_top1 (same cell: same labels, model, seed)",
    "gain_over_pixels": "top1 - pixels_top1 (the pixel arm on the same labels)",
    "best_baseline": "the cell's better baseline without pretraining on validation top-1: "
                     "'supervised' or 'pixels'",
    "gain_over_best": "top1 minus the test top-1 of best_baseline",
    "runs": "the stage keys the row rests on (its own and its input stages') and its draws "
            "('seed:N', 'subset:N'): rows that share one are not independent replicates "
            "(analysis.replicates)",
}
PIXELS = "raw pixels"  # the pixel arm's rows: no network, so no model name


def invocations(study_dir: Location) -> list[dict]:
    """The sweep's invocations.json: each run's wall time, first estimate and machine
    (scaling.study.sweep.record_invocation); [] where there is none."""
    text = storage.read_text(study_dir, "invocations.json")
    return [] if text is None else list(json.loads(text))


def study_spec(study_dir: Location) -> dict | None:
    """The study.json a sweep writes when it starts: grid cells, stages, command."""
    text = storage.read_text(study_dir, "study.json")
    return None if text is None else dict(json.loads(text))


def read_rows(study_dir: Location, spec: dict | None = None) -> pd.DataFrame:
    """Every row the study's grid has written so far. With a spec (study.json), only
    that grid's cells: a storage keeps cells of earlier grids."""
    rows: list[dict] = []
    if spec is not None and "keys" in spec:  # study.json of an older version: no keys
        rows = results.read_cells(study_dir, list(spec["keys"]))
    else:
        for name in storage.list_names(storage.join(study_dir, "cells"), ".json"):
            text = storage.read_text(storage.join(study_dir, "cells"), name)
            if text is not None:
                rows += json.loads(text)["rows"]
    if rows:
        return results.table(rows)  # adds supervised_top1 beside every row of a cell
    text = storage.read_text(study_dir, "results.csv")
    if text is None:
        raise FileNotFoundError(f"no results in {study_dir}: neither cells/*.json nor results.csv")
    return pd.read_csv(io.StringIO(text))


def load(study_dir: Location, spec: dict | None = None) -> pd.DataFrame:
    """The tidy table; ``spec`` defaults to the study's study.json."""
    return tidy(read_rows(study_dir, spec if spec is not None else study_spec(study_dir)))


def model_name(depth: int, width: float, sk: float) -> str:
    w = f"{width:g}x" if width >= 1 else f"1/{round(1 / width)}x"
    return f"R{depth} {w}" + (" +SK" if sk > 0 else "")


def _student(row: pd.Series) -> str:
    """'self' when the student has the teacher's architecture, however the config
    said so (no student, or a student axis equal to the teacher)."""
    depth = row.get("distill.student.depth")
    if depth is None or pd.isna(depth):
        return "self"
    student = (int(depth), float(row["distill.student.width"]),
               float(row.get("distill.student.sk_ratio", 0.0) or 0.0))
    teacher = (int(row["model.depth"]), float(row["model.width"]),
               float(row.get("model.sk_ratio", 0.0) or 0.0))
    same_stem = row.get("distill.student.stem") == row.get("model.stem")
    return "self" if student == teacher and same_stem else model_name(*student)


def tidy(raw: pd.DataFrame) -> pd.DataFrame:
    """Add the DERIVED columns; sort by model size, stage, label fraction, seed."""
    if raw.empty:
        raise ValueError("the results table is empty: no stage has finished yet")
    df = raw.copy()
    df["label_fraction"] = np.where(df["stage"] == "pretrain", np.nan,
                                    df["finetune.label_fraction"].astype(float))
    df["seed"] = df["seed"].astype(int)
    # Tables written before subsets were an axis lack the column: one subset, seed 0.
    df["subset_seed"] = df.get("finetune.subset_seed", pd.Series(0, index=df.index)
                               ).fillna(0).astype(int)
    # Replicates vary the seed, the labelled subset, or both: each pair is one draw.
    df["replicate"] = df.groupby(["seed", "subset_seed"], sort=True).ngroup()
    df["depth"] = df["model.depth"].astype(int)
    df["width"] = df["model.width"].astype(float)
    df["sk"] = df["model.sk_ratio"].astype(float)
    df["head_depth"] = df["head.num_layers"].astype(int)
    df["ft_layer"] = df["finetune.head_layer"].astype(int)
    df["model"] = [PIXELS if st == "pixels" else model_name(d, w, s) for st, d, w, s in
                   zip(df["stage"], df["depth"], df["width"], df["sk"], strict=True)]
    df["student"] = [_student(r) if st == "distill" else None
                     for st, (_, r) in zip(df["stage"], df.iterrows(), strict=True)]
    unl = df.get("distill.unlabelled.name", pd.Series(np.nan, index=df.index))
    df["unlabelled"] = unl.where(unl.notna(), df["data.name"]).where(df["stage"] == "distill")
    df["classes"] = df["data.name"].map(  # imagefolder: the ImageNet presets' 1,000
        lambda n: CATALOG[n].classes if n in CATALOG else None).astype("Int64")
    df["labels"] = df["labelled_examples"]
    df["error"] = 1 - df["top1"]
    nan = pd.Series(np.nan, index=df.index)
    compared = df["stage"].isin(["finetune", "distill"])  # a gain is a pretrained row's
    df["gain_over_supervised"] = (df["top1"] - df["supervised_top1"]).where(compared)
    pixels_top1 = df.get("pixels_top1", nan)
    df["gain_over_pixels"] = (df["top1"] - pixels_top1).where(compared)
    # The best baseline without pretraining, chosen on validation (never on test).
    px_better = df.get("pixels_val_top1", nan) > df.get("supervised_val_top1", nan)
    df["best_baseline"] = np.where(px_better, "pixels", "supervised")
    df["gain_over_best"] = (df["top1"] - np.where(px_better, pixels_top1, df["supervised_top1"])
                            ).where(compared)
    df["runs"] = replicates.row_runs(df)
    # The smallest model of each comparable group is the reference (paper Figure 1 right).
    group = ["stage", "label_fraction", "head_depth", "ft_layer", "seed", "subset_seed"]
    keyed = df.assign(_lf=df["label_fraction"].fillna(-1))
    key = [c if c != "label_fraction" else "_lf" for c in group]
    smallest = keyed.loc[keyed.groupby(key, dropna=False)["params"].idxmin(), [*key, "top1"]]
    ref = keyed.merge(smallest.rename(columns={"top1": "_ref"}), on=key, how="left")["_ref"]
    df["relative_improvement"] = (df["top1"] / ref.to_numpy() - 1).where(
        df["top1"].notna() & (df["stage"] != "pixels"))
    df["_stage"] = df["stage"].map(ORDER)
    df["_px"] = df["stage"] == "pixels"  # the pixel arm's rows last: they have no model
    df = df.sort_values(["_px", "params", "sk", "head_depth", "ft_layer", "_stage",
                         "label_fraction",
                         "seed", "subset_seed"], kind="stable", ignore_index=True)
    return df.drop(columns=["_stage", "_px"])


def missing(spec: dict | None, df: pd.DataFrame) -> list[str]:
    """'cell: stage' for every stage of the grid without a row (a partial sweep)."""
    if spec is None:
        return []
    have = set(zip(df["cell"], df["stage"], strict=True))
    planned = spec["cells"]
    if spec.get("sequential") and "axis.replicate" in df:
        # A sequential design stops when it decides: the replicates after its last look
        # were planned, never due.
        ran = {str(int(r)) for r in df["axis.replicate"].dropna()}
        planned = [c for c in planned
                   if dict(kv.split("=", 1) for kv in c.split(",")).get("replicate") in ran]
    return [f"{c}: {s}" for c in planned for s in spec["stages"] if (c, s) not in have]
