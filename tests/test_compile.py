"""torch.compile, rehearsed on the CPU as a one-GPU run compiles.

Every one-GPU lane compiles its network (runtime.compile: true in cifar10-gpu and
imagenet-gpu). Here each stage of cifar10-gpu's chain that compiles its own
network (the supervised baseline trains the network distillation's student is:
head layer 0), and imagenet-gpu's pretraining (its ImageNet stem and memory queue;
its studies run the other stages on 8 workers, eager), runs whole, compiled by AOTAutograd with the
aot_eager backend (the forward and backward graphs Inductor would be given,
functionalised and partitioned, run by eager kernels), at the presets' networks
(depth, stem, head, queue; 1/16 width on 32 px synthetic images to keep the CPU
quick), for two cells of two epochs each in one process, as a lane runs them: the
preset's network without activation checkpointing (pretraining), then with it (the
chain). (Selective kernels
compile 2.5x slower here; the fake-GPU rehearsal compiles the largest SK cells with
Dynamo at full size.) Counted: graph breaks (none), and graphs compiled after a
stage's first step (none: a recompile mid-stage stalls every GPU of a lane).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from scaling.configure import PRESETS, load_config
from scaling.runtime.local import pipeline_jobs, run_local
from scaling.stage_result import load_final_models
from scaling.stages.registry import STAGES
from scaling.stages.stage_run import StageRun
from scaling.train import fake_cuda
from scaling.train.env import Env

EPOCHS = 2


def lane(name: str, seed: int) -> object:
    """One cell of a preset's lane, small enough for the CPU."""
    return load_config(PRESETS / f"{name}.yaml", {
        "seed": seed, "data.name": "synthetic", "data.image_size": 32, "data.val_size": 16,
        "data.val_excluded_file": None, "model.width": 0.0625,
        "label_fractions": [], "finetune.per_fraction": {}, "finetune.label_fraction": 0.5,
        "finetune.min_steps": 0, "supervised.lr_grid": [], "supervised.min_steps": 0,
        "pretrain.memory.queue_size": 64 if "imagenet" in name else 0,
        "evaluate.linear_steps": 5, "runtime.device": "cpu", "runtime.compile": True,
        **{f"{s}.batch_size": 48 for s in ("pretrain", "finetune", "distill", "supervised")},
        **{f"{s}.epochs": EPOCHS for s in ("pretrain", "finetune", "distill", "supervised")}})


class Compiles:
    """aot_eager, noting for each graph the stage and the step it was compiled at."""

    def __init__(self) -> None:
        self.stage, self.step, self.at = "", 0, list[tuple[str, int]]()
        # Inductor's partitioner (min-cut rematerialisation), eager kernels. (AOT's
        # default partitioner fails the checkpointed backward: a BN buffer it saves is
        # mutated before the backward reads it; Inductor does not use it.)
        inner = torch._dynamo.lookup_backend("aot_eager")

        def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
            self.at.append((self.stage, self.step))
            return inner(gm, example_inputs)

        self.backend = backend


# Compiling R50 takes 5-13 s a stage here: the checkpointed chain for one preset only
# (the fake-GPU rehearsal compiles every stage of both with Dynamo, at full size);
# without checkpointing, pretraining only. (seed, checkpointing, stages) per cell.
ALL = {"pretrain", "finetune", "distill"}
CELLS = {"cifar10-gpu": ((0, False, {"pretrain"}), (1, True, ALL)),
         "imagenet-gpu": ((1, True, {"pretrain"}),)}


@pytest.mark.slow
@pytest.mark.parametrize("name", CELLS)
def test_every_stage_compiles_once_without_breaks(name, tmp_path, monkeypatch):
    compiles = Compiles()
    original = StageRun.after_step

    def after_step(self, loss, lr, images):
        original(self, loss, lr, images)
        compiles.step += 1

    monkeypatch.setattr(StageRun, "after_step", after_step)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    ran = []
    for seed, checkpointing, stages in CELLS[name]:
        env = Env(torch.device("cpu"), compile=True, compile_backend=compiles.backend,
                  checkpointing=checkpointing)
        for job in pipeline_jobs(lane(name, seed), tmp_path / "runs"):
            if not STAGES[job.stage].trains or job.stage not in stages:
                continue
            compiles.stage, compiles.step = f"{job.stage} seed={seed}", 0
            run_local(job.stage, job.cfg, job.out, job.input, env)
            ran.append((compiles.stage, compiles.step))
            if job.stage == "pretrain":  # BN's statistics moved once a step, not twice
                encoder = load_final_models(job.out)["encoder"]
                tracked = {int(v) for k, v in encoder.items() if k.endswith("num_batches_tracked")}
                assert tracked == {compiles.step}, (tracked, compiles.step)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks, \
        dict(torch._dynamo.utils.counters["graph_break"])
    assert {s for s, _ in ran} == {s for s, _ in compiles.at}, "a stage ran uncompiled"
    assert all(steps >= 2 * 2 for _, steps in ran), ran  # two epochs of >= 2 steps
    late = [(stage, step) for stage, step in compiles.at if step > 0]
    assert late == [], f"graphs compiled after a stage's first step: {late}"


def test_global_bn_traces_as_one_graph_on_several_workers():
    """The evidence for compiling under several workers (docs/gpu.md): with the global
    BN, rank 0 of two traces the whole network, forward and backward, as one graph
    with no break (SyncBatchNorm broke it at each BN layer: R18 has 21)."""
    from scaling.model.global_bn import convert_global_bn
    from scaling.model.resnet import ResNet

    compiles = Compiles()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    torch._dynamo.reset()
    with fake_cuda.fake_process_group(2):
        net = convert_global_bn(ResNet(18, 1 / 16, stem="small"))
        torch.compile(net, backend=compiles.backend)(torch.randn(4, 3, 32, 32)).sum().backward()
    torch._dynamo.reset()
    assert len(compiles.at) == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks
