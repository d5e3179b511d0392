"""The Ray Tune seam: a study runs as one Tune trial per cell. A trial is a driver
that walks its cell's stages in dependency order and runs the ones it can on one
Ray Train worker group (``scaling.runtime.ray_train.run_stages``), Train-inside-Tune.

Each distinct stage runs once per study storage. Stage directories are named
by content hash (``scaling.stages.registry.stage_key``), so a finished stage is found
and reused by every cell that needs it. Stages that several running trials need
at the same moment are claimed through one small actor (scaling.study.coordinator):
the claimant runs it, the others do other ready work (their supervised baseline)
or wait, then reuse it.

Storage layout (a directory or a URI):

    <storage>/stages/<stage>-<key>/        stage results, shared by every study there
    <storage>/<study>/results.csv          the tidy table (scaling/study/results.py)
    <storage>/<study>/curves.csv           training curves, tidy (scaling/study/training_curves.py)
    <storage>/<study>/cells/<hash>.json    each cell's rows, written as stages finish
    <storage>/<study>/_tune/<study>-<grid hash>/   Tune's experiment state (resume)
    <storage>/<study>/_train/cell-<cell key>/      Ray Train's checkpoint copies, per cell
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scaling import stage_result, storage
from scaling.config import ConfigError, ExperimentConfig, RuntimeConfig
from scaling.configure import from_dict, to_dict
from scaling.records import ProgressReport, StageEvent, StageResult
from scaling.runtime.lanes import run_on_lane, serve
from scaling.runtime.ray_train import StageJob, run_stages, stage_event
from scaling.stages.registry import STAGES, stage_dir
from scaling.storage import Location
from scaling.study import cluster, results
from scaling.study.console import Console, update_table
from scaling.study.coordinator import StageClaims, renewing
from scaling.study.folder import check_owner, study_record, with_primaries
from scaling.study.lease import Lease
from scaling.study.plan import (
    SHORT,
    Study,
    capacity,
    cell_key,
    cells,
    check_local,
    distinct_runs,
    finished,
    grid_hash,
    required_stages,
    runs_left,
    schedule_order,
    stage_flops,
)
from scaling.study.tracking import MLflow, TensorBoard, check_mlflow
from scaling.study.training_curves import Curves

POLL_SECONDS = 2.0
TRIAL_RETRIES = 1  # Tune re-runs a trial whose process or node died
DRIVER_RESOURCE = cluster.DRIVER_RESOURCE  # trial drivers are scheduled on it


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep invocation shares (Tune passes it pickled)."""

    study: str
    stages: str  # the storage's stages/ location, as text
    study_dir: str
    claims: str  # the Coordinator actor's name
    commit: str
    stages_needed: tuple[str, ...]  # in dependency order
    lanes: bool  # stages run on the lanes' worker groups
    invocation: str  # names this run's rows in the table


@dataclass(frozen=True)
class CellRun:
    """One trial's cell. Tune's param_space holds it as a plain mapping (``encode``:
    params.json stays readable and a sweep state resumes across versions)."""

    id: str
    key: str  # scaling.study.plan.cell_key
    axes: dict[str, Any]  # short axis name -> value
    config: dict[str, Any]  # the cell's ExperimentConfig, to_dict

    def encode(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def decode(cls, d: dict[str, Any]) -> CellRun:
        return cls(d["id"], d["key"], d["axes"], d["config"])


def quiet_shutdown(unraisable: Any) -> None:
    """sys.unraisablehook for trial processes: Ray ends a finished trial's process by
    raising SystemExit in it, which can land inside a weakref callback and print an
    "Exception ignored ... SystemExit" traceback at the end of a sweep. That one is
    the shutdown itself; every other unraisable exception is printed as usual."""
    if isinstance(unraisable.exc_value, SystemExit | KeyboardInterrupt):
        return
    sys.__unraisablehook__(unraisable)


def _tune_report(progress: ProgressReport | StageEvent, path: Path | None) -> None:
    tune.report(dict(progress))


def _record(ctx: SweepContext, cell: CellRun, rows: dict[str, dict[str, Any]],
            job: StageJob, result: StageResult, status: str = "executed") -> None:
    """Add a stage's row to the cell's rows and rewrite its file (results.write_cell).
    Also rank 0's hook (``run_stages(after=...)``), with its own copy of ``rows``."""
    rows[job.stage] = results.stage_row(
        ctx.study, cell.id, cell.axes, cell.config, job.stage,
        job.key, result, status, ctx.commit, ctx.invocation)
    results.write_cell(storage.parse(ctx.study_dir), cell.id, cell.key, list(rows.values()))


def run_cell(config: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune trainable: run or reuse every stage of one cell.

    Each round reuses what is finished and claims every stage it can run now (its
    input finished, or claimed in the same round), then runs the claimed ones in
    dependency order on one Ray Train worker group: a cell pays the group's start-up
    once, not per stage. A stage another trial holds is waited for (its result is
    reused); meanwhile the stages that do not need it run.
    """
    sys.unraisablehook = quiet_shutdown
    cell = CellRun.decode(config["cell"])
    cfg = from_dict(ExperimentConfig, cell.config)
    root = storage.parse(ctx.stages)
    claims = ray.get_actor(ctx.claims)
    trial = tune.get_context().get_trial_id()
    rows: dict[str, dict[str, Any]] = {}
    pending = list(ctx.stages_needed)  # in dependency order
    while pending:
        claimed: list[StageJob] = []
        for stage in list(pending):
            dep = STAGES[stage].input
            if dep in pending and dep not in [j.stage for j in claimed]:
                continue  # its input is not finished, and another trial computes it
            job = StageJob(stage, cfg, stage_dir(root, cfg, stage),
                           stage_dir(root, cfg, dep) if dep else None)
            result = stage_result.read_result(job.out)
            if result is None and ray.get(claims.claim.remote(job.key, trial)):
                claimed.append(job)
            elif result is not None:
                _reused(ctx, cell, rows, job, result)
                pending.remove(stage)
        if not claimed:
            if pending:
                time.sleep(POLL_SECONDS)
            continue
        with renewing(claims, [j.key for j in claimed], trial):
            # Finished by the previous holder between our look and our claim?
            for job in list(claimed):
                if (result := stage_result.read_result(job.out)) is not None:
                    _reused(ctx, cell, rows, job, result)
                    claimed.remove(job)
                    pending.remove(job.stage)
            # Rank 0's progress becomes this trial's metrics, and the StageEvents
            # around each stage its Console lines; the driver prints them once.
            if ctx.lanes:  # a lane's worker group runs them; each row is written here
                run_on_lane(claims, claimed, _tune_report,
                            functools.partial(_record, ctx, cell, rows))
            else:  # rank 0 writes each row with its copy of the rows; then this trial
                ran = run_stages(claimed, f"cell-{cell.key}", report=_tune_report,
                                 ray_storage=str(storage.join(ctx.study_dir, "_train")),
                                 callbacks=(TuneReportCallback(),),
                                 after=functools.partial(_record, ctx, cell, dict(rows)))
                for job, result in zip(claimed, ran, strict=True):
                    _record(ctx, cell, rows, job, result)
        for job in claimed:
            pending.remove(job.stage)


def _reused(ctx: SweepContext, cell: CellRun, rows: dict[str, dict[str, Any]],
            job: StageJob, result: StageResult) -> None:
    _record(ctx, cell, rows, job, result, "reused")
    tune.report(dict(stage_event(job, "reused", result)))


@dataclass(frozen=True)
class Outcome:
    table: pd.DataFrame
    executed: int
    reused: int
    errored: list[str]
    seconds: float
    interrupted: bool = False  # Ctrl-C: stopped with cells unfinished; resumable


def run_study(study: Study, root: Location, *, address: str | None = None,
              restart_errored: bool = False, resume: bool = False,
              mlflow: str | None = None, verbose: bool = False,
              primaries: list[str] | None = None, design: Study | None = None,
              sequential: dict[str, Any] | None = None, wait: bool = False) -> Outcome:
    """Run (or resume) the study's grid on Ray Tune; returns the results table.
    ``primaries``: the findings to pre-register in study.json (folder.with_primaries),
    with ``sequential``, the design testing them. ``design``: the whole grid that
    ``study`` is a look of (study.json records it: a sequential design's looks run
    growing subsets of its replicates under one name). ``wait``: when another driver
    holds the study folder (scaling.study.lease), wait for it instead of stopping.
    ``resume``: there must be a sweep to resume in ``root`` (guards a mistyped URI).
    ``mlflow``: a tracking URI to log the stages' curves to, besides TensorBoard.
    ``verbose``: Ray's and Tune's own console output too (banners, tracebacks);
    without it the console is the study's lines and one line per failed cell."""
    started = time.perf_counter()
    grid = cells(study)
    root = storage.absolute(root)
    study_dir = storage.join(root, study.name)
    tune_root = str(storage.join(study_dir, "_tune"))
    name = f"{study.name}-{grid_hash(study)}"
    path = str(storage.join(tune_root, name))
    # Every check that can fail runs before Ray starts and before anything is written.
    if resume and not tune.Tuner.can_restore(path):
        raise ConfigError("--resume", str(root), "the storage of an earlier run of this study "
                          f"(same --storage, preset, axes and --set): no sweep state in {path}")
    record = with_primaries(study_dir, study_record(design or study), primaries, sequential)
    check_owner(study_dir, record)
    if mlflow:
        check_mlflow(mlflow)
    if address is None and not ray.is_initialized() and not cluster.ray_running_here():
        check_local(study.base)  # before the storage is touched
    storage.check_writable(root, "--storage")
    lease = Lease(study_dir, study.name, f"python -m scaling.study.watch {study_dir}")
    lease.acquire(wait)
    if lease.took_over:
        eprint(f"taking over {study_dir}: its last driver (pid {lease.took_over['pid']} on "
               f"{lease.took_over['host']}) stopped renewing its lease")
    try:
        joined = cluster.connect(address, lambda: check_local(study.base), verbose)
        limit = cluster.autoscaling_limit() if joined else None
        resources = cluster.cluster_resources(limit)
        cap = capacity(study.base, resources)
        cluster.warn_if_not_shared(root, joined, limit)
        claims_name = f"scaling-claims-{study.name}-{os.getpid()}"
        # The handle keeps the actor alive for the sweep; trials look it up by name.
        # On this (the head) node: a trial's node may die; the claims must not.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        lane_rt = _lane_runtime(grid)
        # A lane holds its worker group for the whole sweep: no more lanes than cells.
        lanes = min(cap.concurrent, len(grid)) if lane_rt else 0
        claims = StageClaims.options(name=claims_name, scheduling_strategy=here).remote(lanes)
        ctx = SweepContext(study.name, str(storage.join(root, "stages")), str(study_dir),
                           claims_name, record["git_commit"], required_stages(study), lanes > 0,
                           time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}")
        storage.write_text(study_dir, "study.json", json.dumps(record, indent=1))
        payload = [CellRun(c.id, cell_key(study, c), {SHORT.get(k, k): v for k, v in c.values},
                           to_dict(c.config)).encode() for c in schedule_order(study, grid)]
        trainable = tune.with_resources(tune.with_parameters(run_cell, ctx=ctx), cap.resources)
        runs = distinct_runs(study)
        flops = {(s, k): stage_flops(c, s) for s, keyed in runs.items() for k, c in keyed.items()}
        stages = storage.join(root, "stages")
        logdir = storage.local_dir(study_dir) / "tensorboard" if storage.is_uri(study_dir) else (
            Path(study_dir) / "tensorboard")
        # Tune's own TensorBoard logger joins every stage into one curve per trial under
        # /tmp/ray: ours (scaling.study.tracking) replaces it; its CSV/JSON loggers stay.
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        done = finished(study, root, runs)
        curves = Curves(study_dir, stages)
        # The Console first: it adds a finished stage's curves before the loggers read them.
        estimate = None if joined else _estimate(runs, done)
        console = Console(study_dir, record["keys"], flops, done, estimate, curves)
        load = (os.getloadavg()[0] / max(os.cpu_count() or 1, 1)
                if hasattr(os, "getloadavg") else None)
        callbacks: list[tune.Callback] = [
            console,
            TensorBoard(logdir, curves), CSVLoggerCallback(), JsonLoggerCallback()]
        if mlflow:
            callbacks.append(MLflow(mlflow, study.name, curves))
        print(f"{study.name}: {len(grid)} cells, up to {cap.concurrent} at once; "
              f"results in {study_dir}; curves: tensorboard --logdir {logdir}", flush=True)
        print(console.sweep_line(), flush=True)
        if tune.Tuner.can_restore(path):
            print(f"resuming the sweep in {path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=restart_errored, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"cell": tune.grid_search(payload)},
                # With lanes, a cell's trial waits queued while another runs: its lane
                # goes on to it at once instead of waiting for a trial process to start.
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=cap.concurrent * (1 + bool(lanes))),
                # A trial whose node dies (spot reclaim, a crash) runs again on another,
                # from its stages' last checkpoints. A failing cell also gets one retry.
                run_config=tune.RunConfig(name=name, storage_path=tune_root, callbacks=callbacks,
                                          failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                          verbose=0),
            )
        train_root = str(storage.join(study_dir, "_train"))
        try:
            with quiet_tune(verbose), running_lanes(claims, lanes, lane_rt, claims_name,
                                                    train_root, ctx.invocation, here):
                grid_results = tuner.fit()
        finally:
            ray.kill(claims)
        errored = [(grid_results[i].config or {})["cell"]["id"] for i in range(len(grid_results))
                   if grid_results[i].error is not None]
        df = update_table(study_dir, record["keys"], curves)
        now = df[df["invocation"] == ctx.invocation] if not df.empty else df
        executed = int((now["status"] == "executed").sum()) if not now.empty else 0
        # Tune ends a run it was asked to stop (SIGINT) like a finished one; a cell that
        # neither failed nor has all its rows tells them apart.
        stages_per_cell = {} if df.empty else df.groupby("cell")["stage"].nunique().to_dict()
        interrupted = any(stages_per_cell.get(c.id, 0) < len(ctx.stages_needed)
                          and c.id not in errored for c in grid)
        outcome = Outcome(df, executed, len(now) - executed, errored,
                          time.perf_counter() - started, interrupted)
        record_invocation(study_dir, {
            "invocation": ctx.invocation, "seconds": round(outcome.seconds, 1),
            "estimate_s": None if estimate is None else round(estimate, 1),
            "executed": executed, "reused": outcome.reused, "interrupted": interrupted,
            "cpus": resources.get("CPU"), "gpus": resources.get("GPU"),
            "gpu_type": next((k for k in resources if k.startswith("accelerator_type:")), None),
            "load_per_core_at_start": None if load is None else round(load, 2),
            "cluster": bool(joined)})
        return outcome
    finally:
        lease.release()


def record_invocation(study_dir: Location, entry: dict[str, Any]) -> None:
    """Append this invocation's time, estimate and machine to the study's
    invocations.json (the report's bottom line reads it); written whole, atomically."""
    text = storage.read_text(study_dir, "invocations.json")
    entries = json.loads(text) if text else []
    storage.write_text(study_dir, "invocations.json", json.dumps([*entries, entry], indent=1))


@contextlib.contextmanager
def quiet_tune(verbose: bool) -> Iterator[None]:
    """Tune's console while the body runs: its interrupt hint always dropped (wrong for
    this CLI), and unless ``verbose`` its trial tracebacks (Console says a failure in
    one line) and its default output engine, which prints an experiment box and result
    tables whatever RunConfig.verbose says (the older engine is silent at verbose=0)."""
    tune_log = logging.getLogger("ray.tune.tune")
    controller_log = logging.getLogger("ray.tune.execution.tune_controller")
    engine = os.environ.get(NEW_OUTPUT)
    tune_log.addFilter(_quiet_interrupt)
    if not verbose:
        controller_log.addFilter(_quiet_trial_failure)
        os.environ[NEW_OUTPUT] = "0"
    try:
        yield
    finally:
        tune_log.removeFilter(_quiet_interrupt)
        controller_log.removeFilter(_quiet_trial_failure)
        if engine is None:
            os.environ.pop(NEW_OUTPUT, None)
        else:
            os.environ[NEW_OUTPUT] = engine


@contextlib.contextmanager
def running_lanes(claims: Any, lanes: int, rt: RuntimeConfig | None, claims_name: str,
                  train_root: str, invocation: str, here: Any) -> Iterator[None]:
    """The lanes (scaling.runtime.lanes.serve), one Ray task each, for the body's
    sweep. On the way out the queue closes: idle lanes end at once; after Ctrl-C a
    lane is mid-ticket and is stopped (its stage resumes from its checkpoints on the
    next run)."""
    served = [] if rt is None else [
        ray.remote(serve).options(num_cpus=0, scheduling_strategy=here).remote(
            i, claims_name, rt, train_root, f"lane-{i}-{invocation}")
        for i in range(lanes)]
    try:
        yield
    finally:
        interrupted_mid_ticket = bool(ray.get(claims.in_flight.remote()))
        ray.get(claims.close.remote())
        _, stuck = ray.wait(served, num_returns=len(served),
                            timeout=0 if interrupted_mid_ticket else 30)
        for task in stuck:
            ray.cancel(task, force=True)


def _estimate(runs: dict[str, dict[str, ExperimentConfig]],
              done: set[tuple[str, str]]) -> float | None:
    """Seconds of training steps the runs left take here (scaling.study.estimate,
    as the dry run prints it): the first ETA. None where this machine cannot
    train them (a GPU study started from a CPU-only machine)."""
    from scaling.study.estimate import times_here, wall_clock

    left = runs_left(runs, done)
    if not left or not times_here(left[0][1]):
        return None
    return wall_clock(left).seconds


def _lane_runtime(grid: list[Any]) -> RuntimeConfig | None:
    """The runtime section lanes run with: stages on workers, and every cell asking
    for the same worker group (otherwise each cell's trial starts its own)."""
    runtimes = {c.config.runtime for c in grid}
    shapes = {(r.workers, r.cpus_per_worker, r.gpus_per_worker) for r in runtimes}
    first = grid[0].config.runtime
    return first if first.workers > 0 and len(shapes) == 1 else None


def _quiet_interrupt(record: logging.LogRecord) -> bool:
    """Drop Tune's own words on an interrupt: its resume hint (Tuner.restore(...)) is
    wrong for this CLI, which prints how to resume itself."""
    text = record.getMessage()
    return not any(t in text for t in ("Stop signal received", "has been interrupted",
                                       "Trials did not complete"))


NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"


def _quiet_trial_failure(record: logging.LogRecord) -> bool:
    """Drop Tune's traceback of a failed trial (Console names the cell and the error,
    and the error file holds the traceback)."""
    return not record.getMessage().startswith("Trial task failed")


def summary(outcome: Outcome, study: Study) -> str:
    # The rows themselves are in results.csv; the run ends with a compact table
    # (analysis.headline.results_table) and the headline.
    df = outcome.table
    lines = [f"this run: {outcome.executed} stage runs executed, {outcome.reused} reused, in "
             f"{outcome.seconds:.0f} s; the table has {len(df)} rows for {len(cells(study))} cells"]
    if outcome.errored:
        lines.append(f"{len(outcome.errored)} cells failed: {', '.join(outcome.errored)}; "
                     "re-run with --restart-errored")
    return "\n".join(lines)


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
