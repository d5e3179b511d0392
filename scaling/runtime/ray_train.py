"""The Ray Train seam: each stage as a TorchTrainer whose workers call the very
same stage function as the single-process path (no second training loop).

Ray supplies the worker group (gloo on CPU, NCCL on GPU), restarts it after a
failure (``runtime.max_failures``) and keeps the reported checkpoints in its
storage. The stage itself resumes from its stage directory; a worker that finds
that directory without the checkpoint Ray holds (a fresh node) restores it from
``ray.train.get_checkpoint()`` first. Stage results are identified by the stage
directory, which the pipeline names by content hash, so the Ray run name is the
directory name: running the same stage again resumes or returns it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaling import storage
from scaling.config import ExperimentConfig, from_dict, to_dict
from scaling.records import ProgressReport, StageResult
from scaling.runtime.local import run_local
from scaling.stages.stage_run import NonFiniteLoss
from scaling.storage import Location
from scaling.train.env import Env, Report

ERROR_FILE = "error.json"  # a stage stopped for a reason retries cannot fix


def _report(metrics: ProgressReport, path: Path | None) -> None:
    """Every worker calls this at every checkpoint (ray.train.report is a barrier)."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path else None
    name = path.name if path else None
    ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)


def _restore(out: Path) -> None:
    """Copy Ray's latest checkpoint into the stage directory if it is not there."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    # as_directory() downloads remote checkpoints into a temporary folder: the
    # checkpoint's name (step-NNNNNNNNN) comes from its storage path.
    step = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    with checkpoint.as_directory() as d:
        src = Path(d)
        target = out / "checkpoints" / step
        if not target.exists() and (src / "state.pt").exists():
            tmp = target.with_name(f".{step}.restore")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            tmp.rename(target)
            print(f"restored {step} from Ray Train's storage into {out}", flush=True)


def _worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    # Ray Train logs every report and checkpoint copy at INFO; the stage prints its own.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = from_dict(ExperimentConfig, config["cfg"])
    out = storage.parse(config["out"])
    ctx = ray.train.get_context()
    env = Env(ray.train.torch.get_device(), rank=ctx.get_world_rank(),
              world=ctx.get_world_size(), compile=cfg.runtime.compile, report=_report,
              node=ray.get_runtime_context().get_node_id(),
              progress_lines=config["progress_lines"])
    _restore(storage.local_dir(out))
    input_dir = storage.parse(config["input"]) if config["input"] else None
    try:
        run_local(config["stage"], cfg, out, input_dir, env)
    except NonFiniteLoss as e:
        # Not a failure a restart can fix: end the run cleanly (every worker raises
        # at the same step) and let the driver raise it, instead of max_failures
        # retries from the same checkpoint.
        if env.is_main:
            storage.write_text(out, ERROR_FILE, json.dumps({"error": str(e)}))


def run_stage(
    stage: str, cfg: ExperimentConfig, out: Location, input_dir: Location | None = None,
    ray_storage: str | None = None, report: Report | None = None,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """Run one stage on the connected Ray cluster; returns its result.json.

    ``out`` and ``input_dir`` are directories or URIs (scaling.storage); Ray keeps
    its checkpoints under ``ray_storage``, by default ``_ray`` next to ``out``.
    ``runtime.workers: 0`` runs the stage in this process instead (Ray Train's
    local mode; no worker start-up). A caller that shows progress itself (a Tune
    trial) passes where rank 0's reports go: ``report`` for a stage in this
    process, ``callbacks`` (Ray Train callbacks, e.g. Tune's TuneReportCallback)
    for a worker group; the stage then prints no progress lines of its own.
    """
    out = storage.absolute(out)
    done = storage.read_result(out)
    if done is not None:
        return done
    rt = cfg.runtime
    quiet = report is not None or bool(callbacks)
    if rt.workers == 0:
        import ray

        # A trial records the Ray node it ran on.
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        env = Env.local(rt.device, rt.compile, report=report, progress_lines=not quiet,
                        node=node)
        return run_local(stage, cfg, out, input_dir, env)
    storage.delete(out, ERROR_FILE)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources: dict[str, float] = {"CPU": rt.cpus_per_worker}
    if rt.gpus_per_worker:
        resources["GPU"] = rt.gpus_per_worker
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "stage": stage, "cfg": to_dict(cfg), "out": str(out), "progress_lines": not quiet,
            "input": None if input_dir is None else str(storage.absolute(input_dir))},
        scaling_config=ScalingConfig(num_workers=rt.workers, use_gpu=rt.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=storage.name(out),
            storage_path=ray_storage or str(storage.join(storage.parent(out), "_ray")),
            failure_config=FailureConfig(max_failures=rt.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=rt.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    trainer.fit()
    result = storage.read_result(out)
    error = storage.read_text(out, ERROR_FILE)
    if result is None and error is not None:
        raise NonFiniteLoss(json.loads(error)["error"])
    if result is None:
        raise RuntimeError(f"{stage}: the Ray run ended without writing {out}/result.json")
    return result
