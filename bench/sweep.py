"""What a local sweep spends: stage runs and compute with dedup vs a naive grid, and
the share of the sweep's time not spent in training steps.

    .venv/bin/python bench/sweep.py [--preset local] [-- extra studies/model_size.py args]

Plans the study (cells, stage runs and training FLOPs, deduplicated and naive:
every cell computing its own chain), then runs ``studies/model_size.py`` as a
user would, into a fresh storage (so every distinct stage executes), with
``--no-report``, and times it. From the results table:
- dedup: executed stage runs, each stage key executed once, pretraining runs
  executed == distinct pretraining keys; measured compute (seconds in training
  steps) executed vs what the naive grid would have spent (every row's stage
  computed for its cell);
- time: the sweep's slot time is (trials at once) x (wall time). Of it, training
  steps; inside the stages but outside steps (data loading, evaluation and
  probes, checkpoints); and outside the stages (Ray and Tune start-up, Ray Train
  worker groups, trial scheduling, lanes left idle). "Overhead" is everything but
  training steps, as a share of slot time; "scheduler" is the outside-stages part.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaling.stage_result import RESULT  # noqa: E402
from scaling.study.plan import cells, plan, required_stages, stage_flops  # noqa: E402
from studies.cli import build, parser  # noqa: E402
from studies.model_size import STUDY  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="local", help="studies/model_size.py's preset to time")
    ap.add_argument("--storage", help="default: a fresh temporary directory")
    ap.add_argument("extra", nargs="*", help="more studies/model_size.py arguments (after --)")
    args = ap.parse_args()
    study_args = ["--preset", args.preset, *args.extra]
    study = build(STUDY, parser(STUDY).parse_args(study_args))
    grid, need = cells(study), required_stages(study)
    p = plan(study)
    naive_flops = sum(stage_flops(c.config, s) for c in grid for s in need)
    print(f"{study.name}: {p.cells} cells; stage runs: naive {p.naive_stage_runs}, dedup "
          f"{p.stage_runs} ({', '.join(f'{s} {n}' for s, n in p.distinct.items())})")
    print(f"training FLOPs (estimate): naive {naive_flops:.3g}, dedup {p.flops:.3g} "
          f"({p.flops / naive_flops:.3f} of naive)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(args.storage or tmp)
        command = [sys.executable, "studies/model_size.py", *study_args, "--storage",
                   str(storage), "--no-report"]
        print("running:", " ".join(command[1:]), flush=True)
        started, t0 = time.perf_counter(), time.time()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            sys.exit(f"the sweep failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                     f"{proc.stderr[-3000:]}")
        lanes = int(re.search(r"up to (\d+) at once", proc.stdout).group(1))  # type: ignore[union-attr]
        df = pd.read_csv(storage / study.name / "results.csv")
        ran = df[df["status"] == "executed"]
        # Each executed stage's interval: its result is written last, so the file's
        # time is its end, and the stage's own wall clock gives its start.
        ends = [(storage / "stages" / f"{r.stage}-{r.stage_key}" / RESULT).stat().st_mtime
                - t0 for r in ran.itertuples()]
        spans = sorted(zip([e - w for e, w in zip(ends, ran["wall_seconds"], strict=True)],
                           ends, strict=True))

    twice = ran["stage_key"].duplicated().sum()
    pre_keys = df.loc[df["stage"] == "pretrain", "stage_key"].nunique()
    pre_ran = (ran["stage"] == "pretrain").sum()
    print(f"\ndedup: {len(ran)} stage runs executed, {len(df) - len(ran)} reused, for "
          f"{len(df)} (cell, stage) rows; stage keys executed twice: {twice}; pretraining "
          f"executed {pre_ran} times for {pre_keys} distinct pretraining keys "
          f"(naive: {(df['stage'] == 'pretrain').sum()})")
    naive_s, dedup_s = df["train_seconds"].sum(), ran["train_seconds"].sum()
    print(f"compute in training steps: executed {dedup_s:.0f} s; the naive grid "
          f"{naive_s:.0f} s ({dedup_s / naive_s:.3f} of naive)")

    slot = lanes * wall
    steps = ran["train_seconds"].sum()
    in_stage = (ran["wall_seconds"] - ran["train_seconds"]).sum()
    outside = slot - steps - in_stage
    print(f"\nsweep wall {wall:.0f} s with {lanes} trials at once: slot time {slot:.0f} s")
    print(f"  training steps            {steps:7.0f} s  {100 * steps / slot:5.1f}%")
    print(f"  in stages, outside steps  {in_stage:7.0f} s  {100 * in_stage / slot:5.1f}%  "
          "(data, evaluation/probes, checkpoints)")
    print(f"  outside the stages        {outside:7.0f} s  {100 * outside / slot:5.1f}%  "
          "(Ray/Tune/Train start-up, scheduling, idle lanes)")
    timeline(spans, wall, lanes)
    print(f"overhead (all but training steps) {100 * (1 - steps / slot):.1f}% of slot time; "
          f"scheduler (outside the stages) {100 * outside / slot:.1f}%")


def timeline(spans: list[tuple[float, float]], wall: float, lanes: int) -> None:
    """Where lanes stood idle: before the first stage, after the last, and between."""
    first, last = spans[0][0], max(e for _, e in spans)
    edges = sorted({t for span in spans for t in span})
    # (start, end, stages running) of each interval between consecutive edges
    pieces = [(a, b, sum(s <= a and b <= e for s, e in spans))
              for a, b in zip(edges, edges[1:], strict=False)]
    busy_all = max((b for _, b, running in pieces if running >= lanes), default=first)
    idle_between = idle_tail = 0.0
    for a, b, running in pieces:
        free = max(lanes - running, 0) * (b - a)
        if a >= busy_all:
            idle_tail += free
        else:
            idle_between += free
    print(f"  of which: start-up to the first stage {first:.0f} s x {lanes} lanes; after the "
          f"last stage {wall - last:.0f} s x {lanes}; lanes free between stages "
          f"{idle_between:.0f} s, in the tail (after the last moment all {lanes} were busy) "
          f"{idle_tail:.0f} s; the rest is each stage's data loading and model build "
          "(before its clock starts)")


if __name__ == "__main__":
    main()
