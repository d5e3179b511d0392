"""A study's results table: one tidy row per (cell, stage), documented in
docs/results-table.md. Each cell's rows are written as one file when a stage of
it finishes (``cells/<id hash>.json``); the table (``results.csv``) is rebuilt from
those files, so an interrupted sweep loses nothing and never half-writes a row.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from scaling import storage
from scaling.config import ExperimentConfig
from scaling.configure import from_dict
from scaling.records import StageResult
from scaling.stages.registry import ORDER, STAGES
from scaling.storage import Location

TABLE = "results.csv"
CELLS = "cells"
# Table columns whose names are not their result.json metrics keys (top1 columns are
# the test split's).
RENAMED = {"test_top1": "top1", "teacher_test_top1": "teacher_top1",
           "forward_flops_per_image": "forward_flops"}
# Table column -> result.json metrics key: every metric a stage in the registry reports.
METRICS = {RENAMED.get(k, k): k for stage in STAGES.values() for k in stage.metrics}
# The baselines without pretraining, beside every row of their cell (results.table).
BASELINES = ("supervised", "pixels")


CODE_PATHS = ("scaling", "studies", "analysis", "configs", "subsets", "pyproject.toml")


def git_commit() -> str:
    """The project's commit (with '+dirty' for local changes), or 'unknown'."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        # Only what computes results counts; cluster nodes get just these (cluster/*.yaml).
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS],
                               cwd=repo, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


PER_FRACTION = "finetune.per_fraction."


def unflatten(flat: dict[str, Any]) -> ExperimentConfig:
    """flatten's inverse for a configuration (study.json's ``config``) back into an
    ExperimentConfig: lists were written as JSON text, and per-fraction settings
    are keyed by a fraction whose own dot flatten cannot tell from a section's."""
    nested: dict[str, Any] = {}
    per: dict[float, dict[str, Any]] = {}
    for key, value in flat.items():
        if isinstance(value, str) and value.startswith("["):
            value = json.loads(value)
        if key.startswith(PER_FRACTION):
            fraction, name = key[len(PER_FRACTION):].rsplit(".", 1)
            if value is not None:
                per.setdefault(float(fraction), {})[name] = value
            continue
        node = nested
        *sections, leaf = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    nested.setdefault("finetune", {})["per_fraction"] = per
    return from_dict(ExperimentConfig, nested)


def stage_row(study: str, cell: str, axes: dict[str, Any], config: dict[str, Any], stage: str,
              key: str, result: StageResult, status: str, commit: str, invocation: str
              ) -> dict[str, Any]:
    """One (cell, stage) row: identity, metrics, cost, provenance, and every key of
    the cell's configuration (a reused run was computed by another cell, whose
    settings of later stages may differ: ``stage_key`` names the run itself)."""
    m = result["metrics"]
    rt = result["config"]["runtime"]
    device_hours = m["train_seconds"] * result["world_size"] / 3600
    gpu = result["device"].startswith("cuda")
    row: dict[str, Any] = {
        "study": study, "cell": cell, "stage": stage, "stage_key": key, "status": status,
        "invocation": invocation,
        **{f"axis.{k}": v for k, v in axes.items()},
        **{col: m.get(src) for col, src in METRICS.items()},
        "gpu_hours": device_hours * rt["gpus_per_worker"] if gpu else None,
        "cpu_hours": None if gpu else device_hours * rt["cpus_per_worker"],
        "step": result["step"], "resumed_from": result["resumed_from"],
        "world_size": result["world_size"], "device": result["device"],
        "node": result.get("node"), "git_commit": commit,
        "protocol": json.dumps(result["protocol"], sort_keys=True),
    }
    return row | flatten({k: v for k, v in config.items() if k != "runtime"})


def cell_file(key: str) -> str:
    """A cell's file, named by its key (scaling.study.plan.cell_key): axis values and
    stage runs, so rows of another configuration can never take its place."""
    return f"{key}.json"


def write_cell(study_dir: Location, cell: str, key: str, rows: list[dict[str, Any]]) -> None:
    text = json.dumps({"cell": cell, "key": key, "rows": rows})  # key order = column order
    storage.write_text(storage.join(study_dir, CELLS), cell_file(key), text)


def read_cells(study_dir: Location, keys: list[str]) -> list[dict[str, Any]]:
    """The rows of the cells with these keys; a file that does not parse is named
    and skipped (its stages are reused, so the next run writes it again)."""
    rows: list[dict[str, Any]] = []
    folder = storage.join(study_dir, CELLS)
    for key in keys:
        text = storage.read_text(folder, cell_file(key))
        if text is None:
            continue
        try:
            rows += json.loads(text)["rows"]
        except (ValueError, KeyError, TypeError) as e:
            print(f"warning: {storage.join(folder, cell_file(key))} is unreadable "
                  f"({type(e).__name__}: {e}); skipped", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with the baselines' top-1 (test and validation) beside
    every row of their cell: ``supervised_top1``, ``pixels_top1``, ..."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values(["cell", "stage"], key=lambda c: c.map(ORDER) if c.name == "stage" else c,
                        kind="stable", ignore_index=True)
    at = df.columns.get_loc("top1") + 1
    for stage in BASELINES:
        for col in ("top1", "val_top1"):
            if col not in df:  # rows of a table written before validation existed
                continue
            rows_of = df[df["stage"] == stage].set_index("cell")[col]
            df.insert(at, f"{stage}_{col}", df["cell"].map(rows_of))
            at += 1
    return df


def write_table(study_dir: Location, df: pd.DataFrame) -> None:
    storage.write_text(study_dir, TABLE, df.to_csv(index=False))
