"""A study: a base configuration, a grid of axes over it, and the stages each
grid point (a *cell*) needs. Pure planning, no Ray: expanding the grid,
validating every cell before anything runs, counting the distinct stage runs
(pretraining does not depend on the label fraction, fine-tuning not on the
student, ...), and estimating the compute.

Axes are dotted config keys (``model.width``) or the short names in ``ALIASES``.
``finetune.label_fraction`` defaults to the base config's ``label_fractions``.

``replicate`` is the axis intervals are taken over: replicate ``r`` sets the seed
(pretraining's, and fine-tuning's and the baseline's, which take it from the cell) and
the labelled subset to ``r``, so no two replicates share a stage run. Crossing a
``seed`` axis with a ``subset_seed`` axis is the other design: replicates that share
pretraining runs, which the analysis clusters (analysis.replicates).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from scaling import stage_result, storage
from scaling.catalog import CATALOG
from scaling.config import ConfigError, ExperimentConfig, ModelConfig, did_you_mean
from scaling.configure import config_hash, resolve_fraction, with_overrides
from scaling.stages.registry import STAGES, stage_key, with_inputs
from scaling.stages.registry import stage as stage_entry
from scaling.storage import Location
from scaling.study.cluster import DRIVER_RESOURCE

ALIASES = {
    "depth": "model.depth", "width": "model.width", "sk": "model.sk_ratio",
    "head_depth": "head.num_layers", "ft_layer": "finetune.head_layer",
    "label_fraction": "finetune.label_fraction", "seed": "seed",
    "subset_seed": "finetune.subset_seed",
    "student_depth": "distill.student.depth", "student_width": "distill.student.width",
    "student_sk": "distill.student.sk_ratio", "unlabelled": "distill.unlabelled.name",
}
SHORT = {v: k for k, v in ALIASES.items()}
REPLICATE = "replicate"
# What one replicate draws afresh: every seed a stage run's key hashes.
REPLICATE_KEYS = ("seed", "finetune.subset_seed")


@dataclass(frozen=True)
class Cell:
    """One grid point: its axis values and the full configuration they make."""

    id: str
    values: tuple[tuple[str, Any], ...]  # (dotted key, value) in axis order
    config: ExperimentConfig


@dataclass(frozen=True)
class Study:
    name: str
    base: ExperimentConfig
    axes: tuple[tuple[str, tuple[Any, ...]], ...]  # dotted keys, in grid order
    stages: tuple[str, ...] = tuple(STAGES)
    # The cells, expanded and validated once by make_study (``cells`` returns them).
    grid: tuple[Cell, ...] = field(default=(), compare=False, repr=False)


def canonical(key: str) -> str:
    return ALIASES.get(key, key)


def _leaf_keys(cls: Any, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp):
            inner = [tp]
        name = f"{prefix}{f.name}"
        keys += _leaf_keys(inner[0], f"{name}.") if inner else [name]
    return keys


# Runtime settings are how a cell runs, not what it computes: not an axis.
AXIS_KEYS = (*(k for k in _leaf_keys(ExperimentConfig)
                if not k.startswith("runtime.") and k not in ("name", "label_fractions")),
             REPLICATE)


def make_study(name: str, base: ExperimentConfig, axes: dict[str, list[Any]],
               stages: tuple[str, ...] | None = None) -> Study:
    """Validate axis names and values (each alone) and build the study."""
    resolved: dict[str, tuple[Any, ...]] = {}
    for key, values in axes.items():
        full = canonical(key)
        if full not in AXIS_KEYS:
            raise ConfigError(f"axes.{key}", values, "an axis: one of " + ", ".join(
                sorted(ALIASES)) + ", or a dotted config key (model.stem, pretrain.epochs, ...)"
                + did_you_mean(key, [*ALIASES, *AXIS_KEYS]))
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError(f"axes.{key}", values, "a non-empty list of values")
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"axes.{key}", values, "distinct values")
        if full == REPLICATE and not all(type(v) is int and v >= 0 for v in values):
            raise ConfigError(f"axes.{key}", values, "replicate numbers: integers >= 0")
        resolved[full] = tuple(values)
    if REPLICATE in resolved and (clash := [SHORT.get(k, k) for k in REPLICATE_KEYS
                                            if k in resolved]):
        raise ConfigError(f"axes.{clash[0]}", list(resolved[canonical(clash[0])]),
                          "no seed or subset_seed axis beside a replicate axis (replicate r "
                          "sets both to r); cross seed and subset_seed without it instead")
    if "finetune.label_fraction" not in resolved:
        resolved["finetune.label_fraction"] = tuple(base.label_fractions) or (
            base.finetune.label_fraction,)
    study = Study(name, base, tuple(resolved.items()), stages or Study.stages)
    for stage in study.stages:
        if stage not in STAGES:
            raise ConfigError("stages", stage, ", ".join(STAGES))
    # Every cell must be a valid configuration; expanded once, kept with the study.
    return dataclasses.replace(study, grid=tuple(_expand(study)))


def _cell_config(base: ExperimentConfig, values: tuple[tuple[str, Any], ...]) -> ExperimentConfig:
    overrides: dict[str, Any] = {"label_fractions": [], "finetune.labels_per_class": None}
    student = {k: v for k, v in values if k.startswith("distill.student.")}
    if student and base.distill.student is None:
        # A student axis varies the teacher's architecture, not ModelConfig's defaults.
        teacher = dict(values)
        model = {f.name: teacher.get(f"model.{f.name}", getattr(base.model, f.name))
                 for f in dataclasses.fields(ModelConfig)}
        overrides["distill.student"] = model
    if any(k.startswith("distill.unlabelled.") for k, _ in values) and (
            base.distill.unlabelled is None):
        overrides["distill.unlabelled"] = dataclasses.asdict(base.data)
    keep = []
    for k, v in values:
        for key in REPLICATE_KEYS if k == REPLICATE else (k,):
            overrides[key] = v
            keep.append(key)
    # The cell's fraction picks its per-fraction fine-tuning settings; axes win.
    return resolve_fraction(with_overrides(base, overrides), keep=tuple(keep))


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def cells(study: Study) -> list[Cell]:
    """The grid in order (the last axis varies fastest), as make_study expanded it
    (the one way a Study is built)."""
    return list(study.grid)


def _expand(study: Study) -> list[Cell]:
    """The grid's cells. Raises ConfigError naming the axis value that makes an
    impossible configuration."""
    keys = [k for k, _ in study.axes]
    out = []
    for combo in itertools.product(*(v for _, v in study.axes)):
        values = tuple(zip(keys, combo, strict=True))
        try:
            cfg = _cell_config(study.base, values)
        except ConfigError as e:
            where = ", ".join(f"{SHORT.get(k, k)}={_fmt(v)}" for k, v in values)
            raise ConfigError(e.key, e.value, f"{e.allowed} (in the cell {where})") from None
        cell_id = ",".join(f"{SHORT.get(k, k)}={_fmt(v)}" for k, v in values)
        out.append(Cell(cell_id, values, dataclasses.replace(cfg, name=study.name)))
    return out


def schedule_order(study: Study, grid: list[Cell]) -> list[Cell]:
    """Cells round-robin over their pretraining runs, so trials started together
    pretrain different models instead of waiting for one another; and longest
    first (by estimated FLOPs), so the short cells fill the lanes at the end
    instead of one long cell running alone there (bench/sweep.py's idle tail)."""
    need = required_stages(study)
    cost = {c.id: sum(stage_flops(c.config, s) for s in need) for c in grid}
    groups: dict[str, list[Cell]] = {}
    for cell in sorted(grid, key=lambda c: -cost[c.id]):  # stable: grid order on ties
        groups.setdefault(stage_key(cell.config, "pretrain"), []).append(cell)
    lanes = list(groups.values())  # in order of their longest cell
    return [lane[i] for i in range(max(map(len, lanes))) for lane in lanes if i < len(lane)]


def cell_stages(study: Study, cell: Cell) -> list[tuple[str, str, str | None]]:
    """(stage, key, input stage's key) for the cell, in dependency order."""
    out = []
    for stage in study.stages:
        dep = STAGES[stage].input
        out.append((stage, stage_key(cell.config, stage),
                    stage_key(cell.config, dep) if dep else None))
    return out


def required_stages(study: Study) -> tuple[str, ...]:
    """The study's stages plus what they need (distill needs finetune needs pretrain)."""
    return with_inputs(study.stages)


def cell_key(study: Study, cell: Cell) -> str:
    """A cell's identity: its axis values and the stage runs its configuration makes.
    The same axis values under another base configuration are another cell."""
    return config_hash({"cell": cell.id, "stages": cell_stages(study, cell)})


def grid_hash(study: Study) -> str:
    grid = cells(study)
    return config_hash({"name": study.name, "cells": [c.id for c in grid],
                        "keys": [cell_stages(study, c) for c in grid]})


@dataclass(frozen=True)
class Plan:
    cells: int
    naive_stage_runs: int  # every cell computing its whole chain itself
    distinct: dict[str, int]  # distinct stage runs per stage
    flops: float  # training FLOPs of the distinct runs (estimate)

    @property
    def stage_runs(self) -> int:
        return sum(self.distinct.values())


def model_label(model: ModelConfig) -> str:
    sk = " +SK" if model.sk_ratio else ""
    return f"R{model.depth} {model.width:g}x{sk}"


@functools.cache
def _forward_flops(model: ModelConfig, data_name: str, image_size: int | None) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scaling.model.network import build_encoder

    shape = CATALOG[data_name]
    channels, side = shape.channels, image_size or shape.side
    with torch.device("meta"):
        net = build_encoder(model, channels, side).eval()
        x = torch.empty(1, channels, side, side)
    with FlopCounterMode(display=False) as counter:
        net(x)
    return float(counter.get_total_flops())


def stage_flops(cfg: ExperimentConfig, stage: str) -> float:
    """Training FLOPs of one run of ``stage``: its registry entry's formula, with the
    forward FLOPs of each model on the run's data counted on the meta device."""
    def fwd(model: ModelConfig) -> float:
        return _forward_flops(model, cfg.data.name, cfg.data.image_size)

    return stage_entry(stage).flops(cfg, fwd)


def distinct_runs(study: Study) -> dict[str, dict[str, ExperimentConfig]]:
    """Per stage, its distinct runs (stage key -> a configuration that makes it)."""
    need = required_stages(study)
    seen: dict[str, dict[str, ExperimentConfig]] = {s: {} for s in need}
    for cell in cells(study):
        for stage in need:
            seen[stage].setdefault(stage_key(cell.config, stage), cell.config)
    return seen


def plan(study: Study) -> Plan:
    seen = distinct_runs(study)
    flops = sum(stage_flops(cfg, s) for s, runs in seen.items() for cfg in runs.values())
    n = len(cells(study))
    return Plan(n, n * len(seen), {s: len(v) for s, v in seen.items()}, flops)


def runs_left(runs: dict[str, dict[str, ExperimentConfig]], done: set[tuple[str, str]]
              ) -> list[tuple[str, ExperimentConfig]]:
    """(stage, configuration) of each distinct run not yet ``done``."""
    return [(s, c) for s, keyed in runs.items() for k, c in keyed.items() if (s, k) not in done]


def finished(study: Study, root: Location,
             runs: dict[str, dict[str, ExperimentConfig]] | None = None) -> set[tuple[str, str]]:
    """The study's distinct (stage, key) runs already finished in the storage ``root``
    (``runs``: the study's distinct_runs, where the caller has them)."""
    stages = storage.join(root, "stages")
    return {(stage, key) for stage, keyed in (runs or distinct_runs(study)).items()
            for key in keyed
            if stage_result.read_result(storage.stage_location(stages, stage, key)) is not None}


def describe(study: Study, p: Plan) -> str:
    """What --dry-run prints: the grid, the distinct stage runs, the compute."""
    lines = [f"study {study.name}: {p.cells} cells"]
    for key, values in study.axes:
        lines.append(f"  {SHORT.get(key, key):<16} {', '.join(_fmt(v) for v in values)}")
    per = ", ".join(f"{s} {n}" for s, n in p.distinct.items())
    lines.append(f"stage runs: {p.stage_runs} distinct ({per}); "
                 f"a naive grid would run {p.naive_stage_runs}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Capacity:
    concurrent: int  # trials at once
    resources: dict[str, float]  # one trial driver's own resources


def capacity(cfg: ExperimentConfig, cluster: dict[str, float]) -> Capacity:
    """Trials that fit at once without starving their own Train workers."""
    rt = cfg.runtime
    per_trial_cpu = max(rt.workers, 1) * rt.cpus_per_worker
    per_trial_gpu = rt.workers * rt.gpus_per_worker
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if rt.node_resource and cluster.get(rt.node_resource, 0) < max(rt.workers, 1):
        have = ", ".join(sorted(k for k in cluster if k not in ("CPU", "GPU", "memory")))
        raise ConfigError("runtime.node_resource", rt.node_resource,
                          f"a resource this cluster offers {max(rt.workers, 1)} of (it has: "
                          f"{have or 'no custom resources'}), or null")
    if per_trial_cpu > cpus:
        raise ConfigError("runtime.workers", rt.workers,
                          f"workers x cpus_per_worker <= the cluster's {cpus:g} CPUs")
    if per_trial_gpu > gpus:
        raise ConfigError("runtime.workers", rt.workers,
                          f"workers x gpus_per_worker <= the cluster's {gpus:g} GPUs")
    concurrent = int(cpus // per_trial_cpu)
    if per_trial_gpu:
        concurrent = min(concurrent, int(gpus // per_trial_gpu))
    # With workers=0 the driver trains itself and holds the CPUs; otherwise it only
    # waits on its TorchTrainer and sits on the driver resource (or a little memory).
    resources: dict[str, float] = {"CPU": rt.cpus_per_worker} if rt.workers == 0 else {}
    if DRIVER_RESOURCE in cluster:
        resources[DRIVER_RESOURCE] = 1
    elif not resources:
        resources["memory"] = 256 * 2**20
    return Capacity(max(concurrent, 1), resources)


def check_local(cfg: ExperimentConfig) -> int:
    """What a Ray started on this machine would refuse: more workers than cores,
    runtime.device=cuda without a GPU. Returns the cores."""
    from scaling.train.env import pick_device  # torch: planning itself does not need it

    cpus = os.cpu_count() or 1
    capacity(cfg, {"CPU": cpus})
    pick_device(cfg.runtime.device)
    return cpus


def fmt_duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
