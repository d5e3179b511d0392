"""The stage registry: each stage's name, the stage whose result it starts from,
the settings its key hashes, and the function that runs it. Every list of stages
(the pipeline's chain, a study's plan and dependencies, the results' order) derives
from ``STAGES``; adding a stage is one entry here.

A stage's key is a hash of exactly what it depends on (runtime settings never
count), its input stage's key included: equal keys name equal runs, which is what
dedup, reuse and resume rest on. The functions are imported when a stage runs, so
planning a study does not load them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling import storage
from scaling.config import ExperimentConfig
from scaling.configure import config_hash, fraction_configs
from scaling.records import StageResult
from scaling.storage import Location

if TYPE_CHECKING:  # torch; only a running stage needs it
    from scaling.train.env import Env


@dataclass(frozen=True)
class Stage:
    name: str
    input: str | None  # the stage whose result directory it starts from
    # What its key hashes besides the seed, the model and the data.
    depends: Callable[[ExperimentConfig], dict[str, Any]]
    function: str  # "module:name": (cfg, out[, input_dir], env) -> result dict
    per_fraction: bool  # once per label fraction (pretraining: once for all)
    # False: the key hashes the data and ``depends`` only, no seed and no model (the
    # pixel arm: one run serves every model and seed with the same labels).
    keyed_on_model: bool = True
    trains: bool = True  # False: no network and no training step (no memory plan, no rate)


def _labels(cfg: ExperimentConfig) -> dict[str, Any]:
    ft = cfg.finetune
    labels = {"fraction": ft.label_fraction, "per_class": ft.labels_per_class,
              "seed": ft.subset_seed}
    # Only where set, so the keys of runs without a subset file stay what they were.
    return labels | ({"file": ft.subset_file} if ft.subset_file is not None else {})


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", None, lambda c: {"head": c.head, "pretrain": c.pretrain,
                                       "evaluate": c.evaluate},
          "scaling.stages.pretrain:pretrain", per_fraction=False),
    Stage("finetune", "pretrain", lambda c: {"pretrained": stage_key(c, "pretrain"),
                                             "finetune": c.finetune},
          "scaling.stages.finetune:finetune", per_fraction=True),
    Stage("distill", "finetune", lambda c: {"teacher": stage_key(c, "finetune"),
                                            "distill": c.distill},
          "scaling.stages.distill:distill", per_fraction=True),
    Stage("supervised", None, lambda c: {"labels": _labels(c), "supervised": c.supervised},
          "scaling.stages.finetune:supervised", per_fraction=True),
    Stage("pixels", None, lambda c: {"labels": _labels(c), "pixels": c.pixels},
          "scaling.stages.pixels:pixels", per_fraction=True, keyed_on_model=False,
          trains=False),
)}
ORDER = {name: i for i, name in enumerate(STAGES)}  # dependency order, for sorting


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"stage={name!r}; allowed: {', '.join(STAGES)}")
    return STAGES[name]


def stage_key(cfg: ExperimentConfig, name: str) -> str:
    """Hash of what stage ``name`` depends on (runtime settings never count)."""
    spec = stage(name)
    parts: dict[str, Any] = {"data": cfg.data}
    if spec.keyed_on_model:
        parts = {"seed": cfg.seed, "model": cfg.model} | parts
    return config_hash(parts | spec.depends(cfg))


def stage_dir(root: Location, cfg: ExperimentConfig, name: str) -> Location:
    """Where a stage's result lives: a local directory or a URI (scaling.storage)."""
    return storage.stage_location(root, name, stage_key(cfg, name))


def with_inputs(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``names`` plus every stage they start from, in dependency order."""
    need = set(names)
    for name in list(need):
        dep = stage(name).input
        while dep:
            need.add(dep)
            dep = STAGES[dep].input
    return tuple(s for s in STAGES if s in need)


def stage_runs(cfg: ExperimentConfig, root: Location
               ) -> list[tuple[str, ExperimentConfig, Location]]:
    """(stage, its configuration, its directory) in the order the pipeline runs them."""
    runs: list[tuple[str, ExperimentConfig, Location]] = [
        (s.name, cfg, stage_dir(root, cfg, s.name)) for s in STAGES.values() if not s.per_fraction]
    for c in fraction_configs(cfg):
        runs += [(s.name, c, stage_dir(root, c, s.name))
                 for s in STAGES.values() if s.per_fraction]
    return runs


def run(name: str, cfg: ExperimentConfig, out: Path, input_dir: Path | None,
        env: Env | None) -> StageResult:
    """Run stage ``name`` into the local directory ``out``."""
    spec = stage(name)
    module, attr = spec.function.split(":")
    fn = getattr(importlib.import_module(module), attr)
    if spec.input is None:
        return fn(cfg, out, env)
    if input_dir is None:
        raise ValueError(f"stage {name!r} needs its input stage directory ({spec.input})")
    return fn(cfg, out, input_dir, env)
