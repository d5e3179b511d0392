"""Running stages in this process: one stage (``run_local``; a Ray Train worker
calls it too, with its own ``Env``) and one configuration's whole chain
(``run_pipeline``), whichever runner executes each stage. A ``StageJob`` names
one stage run, as the runners pass it around.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scaling import stage_result, storage
from scaling.config import ExperimentConfig
from scaling.configure import from_dict, to_dict
from scaling.records import StageResult
from scaling.stages import registry
from scaling.stages.registry import STAGES, stage_dir, stage_key, stage_runs
from scaling.storage import Location
from scaling.train.env import Env

Runner = Callable[[str, ExperimentConfig, Location, "Location | None"], StageResult]


def run_local(
    stage: str, cfg: ExperimentConfig, out: Location, input_dir: Location | None,
    env: Env | None = None,
) -> StageResult:
    """Run a stage in this process (a Ray Train worker passes its own ``env``).

    The stage computes in ``storage.local_dir(out)``; for a URI its input is
    fetched first and its outputs are published at the end, and a result already
    published there is returned as it is (a fresh node has no local copy to find).
    """
    if storage.is_uri(out) and (done := stage_result.read_result(out)) is not None:
        return done
    local_in = stage_result.fetch(input_dir) if input_dir is not None else None
    local = storage.local_dir(out)
    if cfg.runtime.compile:
        # One process runs many stages (a lane, a chain): Dynamo's cache of earlier
        # architectures would reach its recompile limit (8) and silently run eager.
        import torch._dynamo

        torch._dynamo.reset()
    result = registry.run(stage, cfg, local, local_in, env)
    if env is None or env.is_main:
        stage_result.publish(local, out)
    return result


@dataclass(frozen=True)
class StageJob:
    """One stage run: the stage, its configuration, its directory and its input's."""

    stage: str
    cfg: ExperimentConfig
    out: Location
    input: Location | None = None

    @property
    def key(self) -> str:
        return stage_key(self.cfg, self.stage)

    def encode(self) -> dict[str, Any]:
        return {"stage": self.stage, "cfg": to_dict(self.cfg), "out": str(self.out),
                "input": None if self.input is None else str(self.input)}

    @classmethod
    def decode(cls, d: dict[str, Any]) -> StageJob:
        return cls(d["stage"], from_dict(ExperimentConfig, d["cfg"]), storage.parse(d["out"]),
                   storage.parse(d["input"]) if d["input"] else None)


def pipeline_jobs(cfg: ExperimentConfig, root: Location) -> list[StageJob]:
    """Every stage run of ``cfg``'s chain, in dependency order."""
    jobs = []
    for stage, c, out in stage_runs(cfg, root):
        dep = STAGES[stage].input
        jobs.append(StageJob(stage, c, out, stage_dir(root, c, dep) if dep else None))
    return jobs


def run_pipeline(
    cfg: ExperimentConfig, root: Location, run: Runner = run_local
) -> list[StageResult]:
    """Run (or resume, or reuse) every stage; one result dict per stage run.

    ``run`` executes one stage: in this process (default) or on Ray
    (``scaling.runtime.ray_train.run_stage``); the chain is the same.
    """
    return [run(j.stage, j.cfg, j.out, j.input) for j in pipeline_jobs(cfg, root)]


