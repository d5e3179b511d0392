"""Watch a running (or finished) study from another terminal; read-only.

    python -m scaling.study.watch runs/model_size-local          # stage runs, the table so far
    python -m scaling.study.watch runs/model_size-local --ray    # and the Ray cluster's status
    python -m scaling.study.watch runs/model_size-local --follow # refresh until it is done
    python -m scaling.study.watch runs/model_size-local --table  # every row of results.csv

A finished study gets a summary (cells, stage runs, their time, mean test top-1 by
stage and label fraction, where the report is); a running one its unfinished stage
runs and the rows written so far.

Progress comes from the storage alone (study.json, the stage directories'
result.json and checkpoints), so it works for a local directory or a URI, while
the sweep runs or after it ended. ``--ray`` runs ``ray status`` with token
authentication on: Ray 2.59+ starts local clusters with it, and a shell without
``RAY_AUTH_MODE=token`` gets an AuthenticationError from ``ray status``; when it
cannot reach Ray the command says so and exits 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from scaling import stage_result, storage
from scaling.storage import Location

COLUMNS = ["cell", "stage", "status", "val_top1", "top1", "supervised_top1", "train_seconds"]


def stage_state(stages: Location, stage: str, key: str) -> str:
    """'finished', 'running at step N' (a checkpoint exists) or 'waiting'."""
    where = storage.stage_location(stages, stage, key)
    if stage_result.read_result(where) is not None:
        return "finished"
    if not storage.is_uri(where):
        steps = sorted(Path(where, "checkpoints").glob("step-*"))
        if steps:
            return f"running, checkpoint at step {int(steps[-1].name[5:])}"
    return "waiting"


def progress(study_dir: Location) -> str:
    return snapshot(study_dir)[0]


def rows_text(df: pd.DataFrame) -> str:
    """results.csv's rows as a reader wants them: top-1 in %, seconds whole, '-' for
    what a stage does not have."""
    show = df[[c for c in COLUMNS if c in df]].copy()
    for c in ("val_top1", "top1", "supervised_top1"):
        if c in show:
            show[c] = (100 * show[c]).round(1)
    if "train_seconds" in show:
        show["train_seconds"] = show["train_seconds"].round(0).astype("Int64")
    return show.to_string(index=False, na_rep="-")


def summary(df: pd.DataFrame) -> list[str]:
    """A finished study in a few lines: cells, stage runs executed and reused, their
    training time, and mean test top-1 (%) by stage (rows) and label fraction."""
    executed = df[df["status"] == "executed"] if "status" in df else df
    hours = executed["train_seconds"].sum() / 3600 if "train_seconds" in df else float("nan")
    lines = [f"{df['cell'].nunique()} cells, {len(df)} (cell, stage) rows: {len(executed)} "
             f"executed, {len(df) - len(executed)} reused; {hours:.2f} h of training steps "
             "in the executed ones"]
    if "top1" in df and "finetune.label_fraction" in df:
        rows = df[df["top1"].notna() & (df["stage"] != "pretrain")]
        if not rows.empty:
            table = (100 * rows.pivot_table(index="stage", columns="finetune.label_fraction",
                                            values="top1", aggfunc="mean")).round(1)
            table.columns = [f"{100 * float(c):g}%" for c in table.columns]
            lines += ["mean test top-1 % over cells (rows: stage; columns: label fraction):",
                      table.to_string(na_rep="-")]
    return lines


def snapshot(study_dir: Location, table: bool = False) -> tuple[str, bool]:
    """The progress text, and whether every stage run has finished. ``table``: every
    row of results.csv, even for a finished study (else its summary)."""
    text = storage.read_text(study_dir, "study.json")
    if text is None:
        raise FileNotFoundError(f"{study_dir} holds no study.json: not a study's folder")
    spec = json.loads(text)
    if "runs" not in spec:
        raise ValueError(f"{study_dir}/study.json was written by an older version; run the "
                         "study's command once (it reuses every finished stage) to update it")
    stages = storage.join(storage.parent(study_dir), "stages")
    states = [(stage, key, stage_state(stages, stage, key)) for stage, key in spec["runs"]]
    done = sum(s == "finished" for _, _, s in states)
    lines = [f"study {spec['study']}: {done}/{len(states)} stage runs finished"]
    lines += [f"  {stage}-{key}: {state}" for stage, key, state in states if state != "finished"]
    finished = done == len(states)
    text = storage.read_text(study_dir, "results.csv")
    if text is not None:
        df = pd.read_csv(io.StringIO(text))
        if finished and not table:
            lines += summary(df)
            report = storage.join(study_dir, "report", "report.html")
            lines.append(f"report: {report} (python -m analysis.report {study_dir}); every "
                         "row: --table")
        else:
            lines += ["results so far (top-1 %):" if not finished else "results (top-1 %):",
                      rows_text(df)]
    if not storage.is_uri(study_dir):
        lines.append(f"curves: tensorboard --logdir {Path(study_dir, 'tensorboard')}")
    return "\n".join(lines), finished


def ray_status() -> tuple[bool, str]:
    """``ray status`` of the cluster this machine runs or joined, with token auth:
    whether it answered, and what it said."""
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    env = {**os.environ}
    if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    proc = subprocess.run([ray, "status"], capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"ray status failed: {last}"
    return True, proc.stdout.rstrip()


def show(study: Location, with_ray: bool, table: bool = False) -> tuple[int, bool]:
    """Print one snapshot: (exit status, whether the study is done)."""
    try:
        text, done = snapshot(study, table)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, True
    print(text)
    if with_ray:
        ok, said = ray_status()
        print(said, file=sys.stdout if ok else sys.stderr)
        if not ok:
            return 1, done
    return 0, done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scaling.study.watch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study's folder: runs/model_size-local or an s3:// URI")
    p.add_argument("--ray", action="store_true",
                   help="also print the Ray cluster's status (exit 1 when Ray cannot be reached)")
    p.add_argument("--follow", nargs="?", type=float, const=5.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 5) until every stage run has "
                        "finished; Ctrl-C stops watching, never the study")
    p.add_argument("--table", action="store_true",
                   help="every row of results.csv, also for a finished study (whose default "
                        "is a summary)")
    args = p.parse_args(argv)
    study = storage.absolute(storage.parse(args.study))
    # On a terminal each refresh replaces the last; into a file or pipe, they follow
    # one another with a time stamp.
    clear = "\x1b[H\x1b[J" if sys.stdout.isatty() else ""
    try:
        while True:
            if args.follow is not None:
                print(clear or f"--- {time.strftime('%H:%M:%S')}", end="" if clear else "\n")
            status, done = show(study, args.ray, args.table)
            if args.follow is None or done or status == 2:
                return status
            sys.stdout.flush()
            time.sleep(args.follow)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
