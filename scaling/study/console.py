"""What a running study shows: the Tune callback that prints one line per stage
event and progress report and a whole-sweep line with an ETA, and keeps the
results table fresh as stages finish."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from scaling.storage import Location
from scaling.study import results
from scaling.study.plan import fmt_duration
from scaling.study.training_curves import Curves


class Console(tune.Callback):
    """One line per progress report (cell, stage, epoch, ETA), and after every stage
    run one line for the whole sweep: k/N distinct stage runs and an ETA. The ETA
    starts from ``estimate_s`` (the dry run's estimate of the training steps left)
    and moves to this run's measured rate (training FLOPs finished per second) as
    stage runs finish: the estimate counts as PRIOR_WEIGHT of the work left at the
    start, so neither one early stage run nor a stage still running (measured time,
    no finished FLOPs yet) throws it far off. The table kept fresh."""

    PRIOR_WEIGHT = 0.25

    def __init__(self, study_dir: Location, cell_keys: list[str],
                 flops: dict[tuple[str, str], float], done: set[tuple[str, str]],
                 estimate_s: float | None = None, curves: Curves | None = None) -> None:
        self.study_dir, self.cell_keys, self.curves = study_dir, cell_keys, curves
        self.flops, self.done = flops, set(done)
        left = sum(f for k, f in flops.items() if k not in self.done)
        w = self.PRIOR_WEIGHT
        # (seconds, FLOPs) the estimate counts for: its rate, with a weight.
        self.prior = (w * estimate_s, w * left) if estimate_s and left else (0.0, 0.0)
        self.started, self.executed_flops = time.monotonic(), 0.0
        self.last: dict[str, float] = {}  # trial id: when its last progress line was
        self.resumed: set[tuple[str, str, int | None]] = set()

    def sweep_line(self) -> str:
        left = sum(f for k, f in self.flops.items() if k not in self.done)
        seconds = self.prior[0] + time.monotonic() - self.started
        rate = (self.prior[1] + self.executed_flops) / max(seconds, 1e-9)
        eta = f"ETA {fmt_duration(left / rate)}" if rate > 0 and left else (
            "done" if not left else "ETA after the first stage run")
        return f"[sweep] {len(self.done)}/{len(self.flops)} stage runs, {eta}"

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        """One line: the cell, the error's last line, where its traceback is."""
        cell = trial.config["cell"]["id"]
        where: str | None = getattr(trial, "error_file", None)
        try:
            lines = [ln for ln in Path(str(where)).read_text().splitlines() if ln.strip()]
            said = lines[-1].strip() if lines else "no message"
        except OSError:
            said = "no error file"
        print(f"[{cell}] failed: {said}" + (f" (traceback: {where})" if where else ""),
              flush=True)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        cell = trial.config["cell"]["id"]
        if result.get("event"):
            print(f"[{cell}] {result['stage']}: {result['event']}", flush=True)
            if result["event"] in ("executed", "reused"):
                run = (result["stage"], result["key"])
                if result["event"] == "executed" and run not in self.done:
                    self.executed_flops += self.flops.get(run, 0.0)
                if run not in self.done:
                    self.done.add(run)
                    print(self.sweep_line(), flush=True)
                update_table(self.study_dir, self.cell_keys, self.curves)
            return
        if "total_steps" not in result:
            return
        resumed = (trial.trial_id, result["stage"], result.get("resumed_from"))
        if resumed[2] is not None and resumed not in self.resumed:  # once per resume
            self.resumed.add(resumed)
            print(f"[{cell}] {result['stage']}: resumed from step {resumed[2]}", flush=True)
        now = time.monotonic()
        if now - self.last.get(trial.trial_id, 0) < 10 and result["step"] < result["total_steps"]:
            return
        self.last[trial.trial_id] = now
        spe = max(result["total_steps"] // result["epochs"], 1)
        epoch = min(math.ceil(result["step"] / spe), result["epochs"])
        loss = f" loss {result['loss']:.4f}" if "loss" in result else ""
        stage = result["stage"] + (f" ({result['variant']})" if result.get("variant") else "")
        print(f"[{cell}] {stage} epoch {epoch}/{result['epochs']} "
              f"step {result['step']}/{result['total_steps']}{loss} "
              f"ETA {fmt_duration(result['eta_s'])}", flush=True)


def update_table(study_dir: Location, cell_keys: list[str], curves: Curves | None = None
                 ) -> pd.DataFrame:
    """Rebuild results.csv from the cells' rows, and add the new stage runs' rows to
    curves.csv (``curves``)."""
    rows = results.read_cells(study_dir, cell_keys)
    df = results.table(rows)
    if not df.empty:
        results.write_table(study_dir, df)
        if curves is not None:
            curves.update(zip(df["stage"], df["stage_key"], strict=True))
    return df
