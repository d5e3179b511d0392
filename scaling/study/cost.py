"""What a GPU study costs before it runs: GPU-hours, wall-clock on the cluster
YAML's GPUs, and money at a price the user states. Estimates from FLOPs, not
measurements: training steps at an assumed MFU of the GPU's dense bf16 peak
(encoder FLOPs only; data loading, evaluation and Ray start-up come on top).
docs/cluster.md's cost table is printed from these functions (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from scaling.study import cluster
from scaling.study.cluster import holds_lane
from scaling.study.plan import capacity, cells, required_stages, stage_flops

if TYPE_CHECKING:
    from scaling.study.plan import Study

MFU = 0.4  # assumed share of the dense bf16 peak a training step reaches
H100_BF16 = 989e12  # FLOP/s, dense
# Dense bf16 peak per GPU of the AWS families cluster YAMLs name (vendor data sheets).
PEAK_BF16 = {"p4d": 312e12, "p4de": 312e12, "p5": 989e12, "p5e": 989e12, "p5en": 989e12,
             "g6e": 362e12}


def h100_hours(flops: float) -> float:
    """GPU-hours on H100s at MFU: the unit every preset's estimate is given in."""
    return flops / (MFU * H100_BF16) / 3600


@dataclass(frozen=True)
class ClusterCost:
    node_type: str  # the node type the study's lanes run on
    instance: str
    gpu_hours: float  # on that node type's GPUs
    gpus_at_once: int  # the lanes' GPUs the cluster can run at once
    # Wall clock, a lower bound: every lane busy, and no shorter than the longest
    # cell's chain of stages (each waits for its input) on one lane.
    hours: float
    price: float | None  # USD per GPU-hour, as given
    cost: float | None

    def line(self) -> str:
        money = (f"; at the assumed ${self.price:g} per GPU-hour (--gpu-price): "
                 f"${self.cost:,.0f}" if self.cost is not None else
                 "; give --gpu-price USD (per GPU-hour) to price it")
        return (f"on {self.instance} ({self.node_type}): {self.gpu_hours:,.3g} GPU-hours, "
                f"at least {self.hours:,.3g} h of wall clock on up to {self.gpus_at_once} "
                f"GPUs at once (every lane busy; no less than the longest cell's chain of "
                f"stages){money}")


def on_cluster(flops: float, chain_flops: float, lane_gpus: int, concurrent: int,
               nodes: list[tuple[str, str, int]], max_gpus: float | None,
               price: float | None) -> ClusterCost | None:
    """``nodes``: (node type, instance type, GPUs) of the YAML's GPU node types;
    ``chain_flops``: the longest cell's stages, one after another. The lanes run on
    the smallest node type that holds one (a lane wider than any node spans the
    largest). None where that type's GPU peak is unknown."""
    if not nodes:
        return None
    counts = [g for _, _, g in nodes]
    fit = [n for n in nodes if holds_lane(n[2], counts, lane_gpus)]
    name, instance, _ = min(fit, key=lambda n: n[2])
    peak = PEAK_BF16.get(instance.split(".")[0])
    if peak is None:
        return None
    gpu_hours = flops / (MFU * peak) / 3600
    at_once = concurrent * lane_gpus
    if max_gpus is not None:
        at_once = max(lane_gpus, min(at_once, int(max_gpus) // lane_gpus * lane_gpus))
    chain_hours = chain_flops / (MFU * peak) / 3600 / lane_gpus
    return ClusterCost(name, instance, gpu_hours, at_once,
                       max(gpu_hours / at_once, chain_hours), price,
                       None if price is None else gpu_hours * price)


def cluster_cost(study: Study, config: dict, flops: float, price: float | None = None
                 ) -> ClusterCost | None:
    """``flops`` of ``study`` on the GPU node types of a cluster ``config``."""
    rt = study.base.runtime
    nodes = cluster.gpu_instances(config)
    most = cluster.max_resources(config)
    lane = max(rt.workers, 1) * rt.gpus_per_worker
    concurrent = capacity(study.base, most).concurrent if most else 1
    stages = required_stages(study)
    chain = max(sum(stage_flops(c.config, s) for s in stages) for c in cells(study))
    return on_cluster(flops, chain, lane, concurrent, nodes, most.get("GPU") if most else None,
                      price)
