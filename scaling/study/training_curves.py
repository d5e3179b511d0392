"""The study's training curves as one tidy table, ``curves.csv`` beside ``results.csv``:
one row per (stage run, step, metric). Columns:

    stage, stage_key   the stage run (results.csv's stage and stage_key)
    lr                 "" for the run the stage's result is; an LR grid's runs by
                       their base LR ("0.02"): every run of the grid, not only the chosen
    step, metric, value  a history point's loss, lr and images_per_s (every
                       runtime.log_every steps), and at the last step the run's
                       other final metrics (val_top1, test_top1, the probes, ...)

The sweep keeps it as stages finish (``Curves.update``, reading each new stage
run's result once through scaling.stage_result); the report's training-curves
figure and the TensorBoard and MLflow logs read it, not the stage folders.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from scaling import stage_result, storage
from scaling.storage import Location

FILE = "curves.csv"
COLUMNS = ["stage", "stage_key", "lr", "step", "metric", "value"]


def result_rows(stage: str, key: str, lr: str, result: Mapping[str, Any]
                ) -> list[dict[str, Any]]:
    """One stage run's rows (scaling.stage_result.curve_rows), named."""
    return [{"stage": stage, "stage_key": key, "lr": lr, **r}
            for r in stage_result.curve_rows(result)]


def run_rows(stages: Location, stage: str, key: str) -> list[dict[str, Any]] | None:
    """Every row of one finished stage run (its LR grid's runs included), or None
    when it has not finished."""
    where = storage.stage_location(stages, stage, key)
    result = stage_result.read_result(where)
    if result is None:
        return None
    rows = result_rows(stage, key, "", result)
    for lr in (result.get("protocol") or {}).get("lr_grid_val_top1") or {}:
        other = stage_result.read_result(storage.join(where, f"lr-{lr}"))
        if other is not None:
            rows += result_rows(stage, key, str(lr), other)
    return rows


def read(study_dir: Location) -> pd.DataFrame:
    """The study's curves.csv (empty, with its columns, where there is none yet)."""
    text = storage.read_text(study_dir, FILE)
    if not text:
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(io.StringIO(text), dtype={"lr": str, "stage_key": str},
                       keep_default_na=False)


class Curves:
    """curves.csv kept in step with results.csv: each finished stage run is read once."""

    def __init__(self, study_dir: Location, stages: Location) -> None:
        self.study_dir, self.stages = study_dir, stages
        df = read(study_dir)
        self.rows: dict[tuple[str, str], list[dict[str, Any]]] = {
            (str(s), str(k)): [{str(c): v for c, v in r.items()} for r in g.to_dict("records")]
            for (s, k), g in df.groupby(["stage", "stage_key"], sort=False)}

    def update(self, runs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Add the finished ones of ``runs`` (stage, key) not yet in the table, and
        rewrite curves.csv if any were; returns those added."""
        added = []
        for run in dict.fromkeys(runs):
            if run in self.rows:
                continue
            rows = run_rows(self.stages, *run)
            if rows is not None:
                self.rows[run] = rows
                added.append(run)
        if added:
            table = pd.DataFrame([r for rows in self.rows.values() for r in rows],
                                 columns=COLUMNS)
            storage.write_text(self.study_dir, FILE, table.to_csv(index=False))
        return added

    def of(self, stage: str, key: str) -> list[dict[str, Any]]:
        """The rows of one stage run ([] until it has finished and been added)."""
        return self.rows.get((stage, key), [])
