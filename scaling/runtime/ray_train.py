"""The Ray Train seam: stages on a TorchTrainer whose workers call the very same
stage function as the single-process path (no second training loop).

Ray supplies the worker group (gloo on CPU, NCCL on GPU), restarts it after a
failure (``runtime.max_failures``) and keeps the reported checkpoints in its
storage. One worker group runs a list of dependent stages in turn
(``run_stages``): its start-up (tens of seconds: controller, workers, process
group) is paid once per list, not once per stage, while each stage keeps its own
directory, checkpoints and result. A stage resumes from its stage directory; a
worker that finds that directory without the checkpoint Ray holds (a fresh node)
restores it from ``ray.train.get_checkpoint()`` first: checkpoint names carry the
stage directory's name, so a list's latest checkpoint finds its stage. The Ray run
is named by the caller (a single stage: its directory name, which the pipeline
names by content hash): running the same list again resumes or returns it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scaling import stage_result, storage
from scaling.config import ExperimentConfig, RuntimeConfig
from scaling.records import ProgressReport, StageEvent, StageResult
from scaling.runtime.local import StageJob, run_local
from scaling.stages.stage_run import NonFiniteLoss
from scaling.storage import Location
from scaling.train.env import Env, check_device

ERROR_FILE = "error.json"  # a stage stopped for a reason retries cannot fix
# Checkpoint names in Ray's storage: the stage directory's name and the checkpoint's
# path in it, e.g. finetune-<key>@lr-0.1@checkpoints@step-000000040.
SEP = "@"

# Where rank 0's progress goes when the caller watches it: the stages' reports and,
# around each stage, a StageEvent.
Watch = Callable[[ProgressReport | StageEvent, Path | None], None]
# Called on rank 0 after each stage of a list finishes (e.g. to record its row).
After = Callable[["StageJob", StageResult], None]


def stage_event(job: StageJob, event: str, result: StageResult | None = None) -> StageEvent:
    """What a watcher hears of a stage: "start", "executed" or "reused"."""
    top1 = result["metrics"].get("test_top1") if result else None
    return {"stage": job.stage, "key": job.key, "event": event, "top1": top1}


def _report(metrics: ProgressReport, path: Path | None, job: StageJob,
            also: Callable[[StageJob, ProgressReport], None] | None = None) -> None:
    """Every worker calls this at every checkpoint (ray.train.report is a barrier)."""
    import ray.train

    if also is not None:
        also(job, metrics)
    checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path else None
    name = None
    if path:  # which stage, and where in it (an LR grid's runs have their own)
        where = path.relative_to(storage.local_dir(job.out)).parts
        name = SEP.join([storage.name(job.out), *where])
    # Synchronous upload, also for checkpoints by wall time (runtime.checkpoint_minutes):
    # Ray's ASYNC mode uploaded from the stage's own checkpoint folder while
    # keep_checkpoints pruned it, and lost the later uploads (seen with a checkpoint a
    # step). The write itself is off the loop; the upload costs seconds every 10 minutes.
    ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)


def restore(jobs: Sequence[StageJob]) -> None:
    """Copy Ray's latest checkpoint into its stage's directory if it is not there."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    # as_directory() downloads remote checkpoints into a temporary folder: the
    # checkpoint's name (see _report) comes from its storage path.
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    found = next(((j, name[len(storage.name(j.out)) + 1:].split(SEP)) for j in jobs
                  if name.startswith(storage.name(j.out) + SEP)), None)
    if found is None and SEP not in name and len(jobs) == 1:  # written before lists existed
        found = (jobs[0], ["checkpoints", name])
    if found is None:  # a stage this run has no longer to run (finished, or not in it)
        return
    job, where = found
    target = storage.local_dir(job.out).joinpath(*where)
    with checkpoint.as_directory() as d:
        src = Path(d)
        if not target.exists() and (src / "state.pt").exists():
            tmp = target.with_name(f".{target.name}.restore")
            shutil.rmtree(tmp, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, tmp)
            tmp.rename(target)
            print(f"restored {target} from Ray Train's storage", flush=True)


# What each earlier run under a Ray storage holds, listed once per process: a run of
# an earlier invocation no longer changes, so a lane looks at each once, not once per
# ticket (with 500 earlier runs, 501 LIST calls a ticket before; bench/scale.py).
_run_listings: dict[str, list[str]] = {}


def _listing(ray_storage: Location, run: str, live: str | None) -> list[str]:
    """The checkpoint names in ``run``; a run of the ``live`` invocation (still being
    written) is listed afresh every time."""
    where = str(storage.join(ray_storage, run))
    if live and live in run:
        return storage.list_dirs(where)
    if where not in _run_listings:
        _run_listings[where] = storage.list_dirs(where)
    return _run_listings[where]


def restore_from_runs(jobs: Sequence[StageJob], ray_storage: Location,
                      live: str | None = None) -> None:
    """Ray's latest copies of each stage's checkpoints, from any run under
    ``ray_storage``, into a stage directory that has none: with URI storage a stage
    killed with its sweep's driver has its checkpoints only there, under the run of
    the invocation that was killed (lane runs are named per invocation). ``live``:
    what names this invocation's runs, whose listings may still grow."""
    for job in jobs:
        local = storage.local_dir(job.out)
        if (not storage.is_uri(job.out) or any(local.rglob("state.pt"))
                or stage_result.read_result(job.out) is not None):  # finished: run_local returns it
            continue
        prefix = storage.name(job.out) + SEP
        latest: dict[tuple[str, ...], tuple[str, Location]] = {}
        for run in storage.list_dirs(ray_storage):  # one LIST: runs started since
            for name in _listing(ray_storage, run, live):
                if name.startswith(prefix):
                    *where, step = name[len(prefix):].split(SEP)  # step-<zero-padded>
                    if step > latest.get(tuple(where), ("", ""))[0]:
                        latest[tuple(where)] = (step, storage.join(ray_storage, run, name))
        for parts, (step, location) in latest.items():
            storage.download_dir(location, local.joinpath(*parts, step))
            print(f"restored {local.joinpath(*parts, step)} from Ray Train's storage",
                  flush=True)


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    jobs = [StageJob.decode(j) for j in config["jobs"]]
    base = worker_env(jobs[0].cfg.runtime, config["progress_lines"])
    restore(jobs)

    def event(e: StageEvent) -> None:
        if config["events"]:  # a barrier too: every worker reports it
            ray.train.report(dict(e))

    run_jobs(jobs, base, event, config["after"])


def worker_env(rt: RuntimeConfig, progress_lines: bool) -> Env:
    """This Ray Train worker's Env (no report hook yet: run_jobs sets one per stage).
    A worker that asked for a GPU and sees none raises instead of training on the CPU."""
    import ray
    import ray.train
    import ray.train.torch

    # Ray Train logs every report and checkpoint copy at INFO; the stage prints its own.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    check_device(rt.device, rt.gpus_per_worker, device)
    return Env(device, rank=ctx.get_world_rank(),
               world=ctx.get_world_size(), compile=rt.compile,
               checkpointing=rt.activation_checkpointing, cpus=rt.cpus_per_worker,
               node=ray.get_runtime_context().get_node_id(), progress_lines=progress_lines)


def run_jobs(jobs: Sequence[StageJob], base: Env, event: Callable[[StageEvent], None],
             after: After | None = None,
             report: Callable[[StageJob, ProgressReport], None] | None = None) -> None:
    """A worker's loop over a list of stages (every worker of the group runs it).

    ``event`` hears each stage's "start" and "executed"; ``after`` runs on rank 0
    as each stage finishes; ``report`` (rank 0) hears each checkpoint's progress
    besides Ray. A non-finite loss ends the list (later stages do not run): the
    stage's ERROR_FILE says why, for the driver to raise.
    """
    import torch.distributed

    for job in jobs:
        hook = functools.partial(_report, job=job, also=report if base.is_main else None)
        env = dataclasses.replace(base, report=hook)
        event(stage_event(job, "start"))
        try:
            # After a restart of the group, the stages done before it return at once.
            result = run_local(job.stage, job.cfg, job.out, job.input, env)
        except NonFiniteLoss as e:
            # Not a failure a restart can fix: end the list cleanly (every worker raises
            # at the same step) and let the driver raise it, instead of max_failures
            # retries from the same checkpoint.
            if env.is_main:
                storage.write_text(job.out, ERROR_FILE, json.dumps({"error": str(e)}))
            return
        if after is not None and env.is_main:
            after(job, result)
        if base.world > 1:  # the next stage may read this one's result.json from rank 0
            torch.distributed.barrier()
        event(stage_event(job, "executed", result))


def run_stages(
    jobs: Sequence[StageJob], name: str, ray_storage: str | None = None,
    report: Watch | None = None, callbacks: Sequence[Any] = (), after: After | None = None,
) -> list[StageResult]:
    """Run stages in turn on one Ray Train worker group; returns their results.

    ``jobs`` are in dependency order (a stage's input is finished or earlier in the
    list) and share one ``runtime`` section. ``name`` names the Ray run: the same
    name and storage resume it. ``out`` and ``input`` are directories or URIs
    (scaling.storage); Ray keeps its checkpoints under ``ray_storage``, by default
    ``_ray`` next to the first ``out``. ``runtime.workers: 0`` runs the stages in
    this process instead (no worker start-up). A caller that shows progress itself
    (a Tune trial) passes where rank 0's reports go: ``report`` for stages in this
    process, ``callbacks`` (Ray Train callbacks, e.g. Tune's TuneReportCallback)
    for a worker group; each stage is then framed by a "start" and an "executed"
    StageEvent and prints no progress lines of its own. ``after`` runs on rank 0
    as each stage finishes.
    """
    jobs = [dataclasses.replace(j, out=storage.absolute(j.out),
                                input=None if j.input is None else storage.absolute(j.input))
            for j in jobs]
    found = {j.out: stage_result.read_result(j.out) for j in jobs}
    todo = [j for j in jobs if found[j.out] is None]
    if not todo:
        return [r for r in found.values() if r is not None]
    rt = todo[0].cfg.runtime
    if any(j.cfg.runtime != rt for j in todo):
        raise ValueError("run_stages: every stage of one list needs the same runtime section")
    quiet = report is not None or bool(callbacks)
    if rt.workers == 0:
        _run_here(todo, report, quiet, after)
    else:
        _run_on_workers(todo, name, ray_storage, callbacks, quiet, after)
    return collect(jobs, found)


def collect(jobs: Sequence[StageJob],
            found: dict[Location, StageResult | None] | None = None) -> list[StageResult]:
    """The results of stages a runner ran (``found``: those read before), or the
    error that stopped them: NonFiniteLoss from a stage's ERROR_FILE."""
    done = []
    for job in jobs:
        result = (found or {}).get(job.out) or stage_result.read_result(job.out)
        error = storage.read_text(job.out, ERROR_FILE) if result is None else None
        if result is None and error is not None:
            raise NonFiniteLoss(json.loads(error)["error"])
        if result is None:
            raise RuntimeError(f"{job.stage}: the Ray run ended without writing "
                               f"{job.out}/result.json")
        done.append(result)
    return done


def _run_here(jobs: Sequence[StageJob], report: Watch | None, quiet: bool,
              after: After | None) -> None:
    import ray

    # A trial records the Ray node it ran on.
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    rt = jobs[0].cfg.runtime
    env = Env.local(rt, report=report, progress_lines=not quiet, node=node)
    for job in jobs:
        if report is not None:
            report(stage_event(job, "start"), None)
        result = run_local(job.stage, job.cfg, job.out, job.input, env)
        if after is not None:
            after(job, result)
        if report is not None:
            report(stage_event(job, "executed", result), None)


def _run_on_workers(jobs: Sequence[StageJob], name: str, ray_storage: str | None,
                    callbacks: Sequence[Any], quiet: bool, after: After | None) -> None:
    for job in jobs:
        storage.delete(job.out, ERROR_FILE)
    config = {"jobs": [j.encode() for j in jobs], "progress_lines": not quiet,
              "events": quiet, "after": after}
    where = ray_storage or str(storage.join(storage.parent(jobs[0].out), "_ray"))
    trainer(_worker, config, jobs[0].cfg.runtime, name, where, callbacks).fit()


def trainer(fn: Callable[[dict[str, Any]], None], config: dict[str, Any], rt: RuntimeConfig,
            name: str, ray_storage: str, callbacks: Sequence[Any] = ()) -> Any:
    """A TorchTrainer running ``fn(config)`` on ``rt``'s worker group."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources: dict[str, float] = {"CPU": rt.cpus_per_worker}
    if rt.gpus_per_worker:
        resources["GPU"] = rt.gpus_per_worker
    if rt.node_resource:
        resources[rt.node_resource] = 1
    return TorchTrainer(
        fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=rt.workers, use_gpu=rt.gpus_per_worker > 0,
            resources_per_worker=resources, placement_strategy=placement(rt)),
        # Explicit, and long enough for rank 0's evaluation between collectives.
        torch_config=TorchConfig(timeout_s=rt.collective_timeout_s),
        run_config=RunConfig(
            name=name,
            storage_path=ray_storage,
            failure_config=FailureConfig(max_failures=rt.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=rt.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


GPUS_PER_NODE = 8  # the largest GPU nodes of cluster/gpu.yaml


def placement(rt: RuntimeConfig) -> str:
    """A GPU group that fits one node stays on one node (STRICT_PACK): NCCL over
    NVLink, never across nodes by accident. A larger one (the ImageNet lanes' 16)
    spans nodes as it must (PACK: as few as hold it); CPU groups may spread (PACK),
    as the two-node tests need."""
    gpus = rt.workers * rt.gpus_per_worker
    return "STRICT_PACK" if 1 < gpus <= GPUS_PER_NODE else "PACK"


def run_stage(
    stage: str, cfg: ExperimentConfig, out: Location, input_dir: Location | None = None,
    ray_storage: str | None = None, report: Watch | None = None,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """Run one stage on the connected Ray cluster (``run_stages`` with one job, the
    Ray run named by the stage's directory); returns its result.json."""
    return run_stages([StageJob(stage, cfg, out, input_dir)], storage.name(out), ray_storage,
                      report, callbacks)[0]
