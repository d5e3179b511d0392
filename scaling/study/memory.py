"""Per-GPU memory of a study's stage runs, against the GPUs they will run on.

Each distinct footprint (stage, network, per-GPU batch, what else the step holds)
is measured once by running the step on fake tensors (scaling.train.footprint);
stage runs that differ only in what does not change memory (seeds, label
fractions, learning rates) share it. ``--dry-run`` prints the plan; a study whose
plan does not fit exits 2 before anything starts, naming the cell and the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.catalog import CATALOG
from scaling.config import ConfigError, ExperimentConfig
from scaling.stages.registry import STAGES
from scaling.study import cluster
from scaling.study.plan import Study, cells, model_label, required_stages
from scaling.train.footprint import Footprint, GiB, step_footprint


@dataclass(frozen=True)
class GpuLimit:
    bytes: int
    source: str  # where the number comes from, for the messages


@dataclass(frozen=True)
class RunMemory:
    stage: str
    model: str
    batch: int  # per GPU
    footprint: Footprint
    cells: tuple[str, ...]  # the cells whose runs have this footprint


def per_gpu_batch(cfg: ExperimentConfig, stage: str) -> int:
    return int(getattr(cfg, stage).batch_size) // max(cfg.runtime.workers, 1)


def _key(cfg: ExperimentConfig, stage: str) -> tuple[Any, ...]:
    """What a step's memory depends on; runs with the same key share a footprint."""
    return (stage, cfg.student if stage == "distill" else cfg.model, cfg.head,
            cfg.finetune.head_layer if stage == "finetune" else None,
            cfg.pretrain.memory if stage == "pretrain" else None,
            cfg.distill.alpha > 0 if stage == "distill" else None,
            cfg.model if stage == "distill" else None,
            per_gpu_batch(cfg, stage), cfg.data.name, cfg.data.image_size,
            cfg.runtime.activation_checkpointing, cfg.runtime.workers)


def memory_plan(study: Study) -> list[RunMemory]:
    """Every distinct footprint of the study's stage runs, largest first."""
    found: dict[tuple[Any, ...], tuple[ExperimentConfig, list[str]]] = {}
    for cell in cells(study):
        for stage in (s for s in required_stages(study) if STAGES[s].trains):
            entry = found.setdefault(_key(cell.config, stage), (cell.config, []))
            entry[1].append(cell.id)
    out = []
    for key, (cfg, where) in found.items():
        stage = key[0]
        shape = CATALOG[cfg.data.name]
        side = cfg.data.image_size or shape.side
        fp = step_footprint(cfg, stage, per_gpu_batch(cfg, stage), shape.channels, side,
                            shape.classes, shape.images if shape.in_memory else 0,
                            world=max(cfg.runtime.workers, 1))
        model = model_label(cfg.student if stage == "distill" else cfg.model)
        out.append(RunMemory(stage, model, per_gpu_batch(cfg, stage), fp, tuple(where)))
    return sorted(out, key=lambda r: -r.footprint.needed)


def gpu_limit(cfg: ExperimentConfig, gpu_memory_gb: float | None, cluster_yaml: str | None
              ) -> GpuLimit | None:
    """The smallest GPU among the node types a lane of ``cfg`` can land on: from
    --gpu-memory, a cluster YAML, or the running cluster's config on a head node."""
    if gpu_memory_gb is not None:
        if not 0 < gpu_memory_gb < 10_000:  # nan fails this too
            raise ConfigError("--gpu-memory", gpu_memory_gb, "a GPU's memory in GB (10^9 "
                              "bytes) above 0, e.g. 80 for an 80 GB A100")
        return GpuLimit(int(gpu_memory_gb * 10**9), f"--gpu-memory {gpu_memory_gb:g}")
    config, source = None, ""
    if cluster_yaml is not None:
        config, source = cluster.load(cluster_yaml), cluster_yaml
    elif (config := cluster.bootstrap_config()) is not None:
        source = "this cluster's config"
    if config is None:
        return None
    lane = max(cfg.runtime.workers, 1) * cfg.runtime.gpus_per_worker
    nodes = cluster.gpu_nodes(config)
    counts = [g for _, g, _ in nodes]
    fit = [(name, b) for name, g, b in nodes
           if cluster.holds_lane(g, counts, lane) and b is not None]
    if not fit:
        return None
    name, limit = min(fit, key=lambda nb: nb[1])
    return GpuLimit(limit, f"{limit / 1e9:g} GB GPUs of node type {name} in {source}")


MERGE_BYTES = GiB // 2  # rows of one stage, model and batch this close read as one


def merged(runs: list[RunMemory]) -> list[RunMemory]:
    """Runs of one stage, model and per-GPU batch whose needs are within 0.5 GiB of
    each other, as one row in the plan's order: the larger footprint, every cell.
    (Fine-tuning at two label fractions differs by a few MiB of data; two rows said
    nothing a reader could use.)"""
    groups: list[RunMemory] = []
    for r in runs:
        for i, g in enumerate(groups):
            if ((g.stage, g.model, g.batch) == (r.stage, r.model, r.batch)
                    and abs(g.footprint.needed - r.footprint.needed) <= MERGE_BYTES):
                big = max(g, r, key=lambda x: x.footprint.needed)
                groups[i] = RunMemory(g.stage, g.model, g.batch, big.footprint,
                                      g.cells + r.cells)
                break
        else:
            groups.append(r)
    return groups


def describe_memory(runs: list[RunMemory], limit: GpuLimit | None, cfg: ExperimentConfig
                    ) -> str:
    rt = cfg.runtime
    lane = f"{max(rt.workers, 1)} GPU{'s' if rt.workers > 1 else ''} a lane"
    ckpt = "on" if rt.activation_checkpointing else "off"
    against = f"; limit {limit.bytes / GiB:.1f} GiB ({limit.source})" if limit else (
        "; no GPU size known (give --gpu-memory GB or --cluster YAML to check the fit)")
    lines = [f"memory per GPU ({lane}, activation checkpointing {ckpt}; needed = peak "
             f"x1.1 + 1 GiB{against}):"]
    for r in merged(runs):
        flag = "  DOES NOT FIT" if limit and r.footprint.needed > limit.bytes else ""
        n = len(r.cells)
        lines.append(f"  {r.stage:<10} {r.model:<12} {r.batch:>5}/GPU "
                     f"{r.footprint.needed / GiB:6.1f} GiB needed{flag} "
                     f"(GiB: {r.footprint.parts()}; {n} cell{'s' if n != 1 else ''})")
    return "\n".join(lines)


def problems(runs: list[RunMemory], limit: GpuLimit | None, cfg: ExperimentConfig,
             show: int = 6) -> list[str]:
    """What does not fit: the largest ``show`` runs by name, then what would fix them."""
    if limit is None:
        return []
    over = [r for r in runs if r.footprint.needed > limit.bytes]
    out = []
    for r in over[:show]:
        more = f" (and {len(r.cells) - 1} more cells)" if len(r.cells) > 1 else ""
        out.append(f"cell {r.cells[0]}{more}, stage {r.stage} ({r.model}, {r.batch} "
                   f"images/GPU): needs {r.footprint.needed / GiB:.1f} GiB per GPU, over the "
                   f"{limit.bytes / GiB:.1f} GiB of {limit.source}")
    if len(over) > show:
        out.append(f"... and {len(over) - show} more stage runs that do not fit (marked in the "
                   "memory plan above)")
    if over:
        rt = cfg.runtime
        fixes = [f"more GPUs a lane (--set runtime.workers={2 * max(rt.workers, 1)} halves the "
                 "per-GPU batch)"]
        if not rt.activation_checkpointing:
            fixes.append("activation checkpointing (--set runtime.activation_checkpointing=true:"
                         " saved activations several-fold smaller, ~1/3 more compute)")
        fixes += ["GPUs with more memory (a node type in the cluster YAML, or --gpu-memory)",
                  "a smaller batch_size (a change of method: the paper's batches are the "
                  "presets')"]
        out.append("the memory plan does not fit; fix it with " + "; or ".join(fixes))
    return out


def default_cluster_yaml() -> str | None:
    """cluster/gpu.yaml of this checkout, where it exists (a laptop planning a run)."""
    path = Path(__file__).resolve().parents[2] / "cluster" / "gpu.yaml"
    return str(path) if path.exists() else None
