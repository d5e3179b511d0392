"""Running stages in this process: one stage (``run_local``; a Ray Train worker
calls it too, with its own ``Env``) and one configuration's whole chain
(``run_pipeline``), whichever runner executes each stage.
"""

from __future__ import annotations

from collections.abc import Callable

from scaling import storage
from scaling.config import ExperimentConfig
from scaling.records import StageResult
from scaling.stages import registry
from scaling.stages.registry import STAGES, stage_dir, stage_runs
from scaling.storage import Location
from scaling.train.env import Env

Runner = Callable[[str, ExperimentConfig, Location, "Location | None"], StageResult]


def run_local(
    stage: str, cfg: ExperimentConfig, out: Location, input_dir: Location | None,
    env: Env | None = None,
) -> StageResult:
    """Run a stage in this process (a Ray Train worker passes its own ``env``).

    The stage computes in ``storage.local_dir(out)``; for a URI its input is
    fetched first and its outputs are published at the end.
    """
    local_in = storage.fetch(input_dir) if input_dir is not None else None
    local = storage.local_dir(out)
    result = registry.run(stage, cfg, local, local_in, env)
    if env is None or env.is_main:
        storage.publish(local, out)
    return result


def run_pipeline(
    cfg: ExperimentConfig, root: Location, run: Runner = run_local
) -> list[StageResult]:
    """Run (or resume, or reuse) every stage; one result dict per stage run.

    ``run`` executes one stage: in this process (default) or on Ray
    (``scaling.runtime.ray_train.run_stage``); the chain is the same.
    """
    results = []
    for stage, c, out in stage_runs(cfg, root):
        dep = STAGES[stage].input
        results.append(run(stage, c, out, stage_dir(root, c, dep) if dep else None))
    return results


