"""The GPU presets' stages, rehearsed on fake CUDA tensors (tests/rehearsal.py).

No GPU has run this code; these tests run each stage's real set-up and first steps
as a GPU would see them, at the preset's per-GPU batch and as the preset runs
(cifar10-gpu: one worker, compiled; imagenet-gpu: rank 0 of 8, eager): every tensor
on the device, convolutions in bf16 under autocast, parameters in channels_last,
optimiser state on the device, no host sync in the steady-state step (its tail
included, but for the one read a log point allows), and a checkpoint that comes back
onto the device when the stage resumes. The backward, which fake CUDA tensors cannot
run, is rehearsed on the CPU (``rehearse_backward``). Each kind of defect the
rehearsal claims to catch has a test here that plants one and sees it fail.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from rehearsal import rehearse_backward, run_rehearsal, tensors_of

from scaling.config import ExperimentConfig
from scaling.configure import PRESETS, load_config
from scaling.model.network import build_classifier, build_contrastive
from scaling.stages.stage_run import StageRun
from scaling.train import fake_cuda
from scaling.train.env import Env
from scaling.train.measure import FlopCounterMode, forward_flops_per_image

# (preset, image side, channels, classes, data-parallel workers of its studies)
PRESETS_GPU = {"cifar10-gpu": (32, 3, 10, 1), "imagenet-gpu": (224, 3, 1000, 8)}


def preset(name: str, model: dict | None = None, **extra: object) -> ExperimentConfig:
    """The preset at its per-GPU batch on one fake GPU, its data replaced."""
    side, _, _, workers = PRESETS_GPU[name]
    base = load_config(PRESETS / f"{name}.yaml")
    per_gpu = {s: getattr(base, s).batch_size // workers
               for s in ("pretrain", "finetune", "distill", "supervised")}
    overrides = {
        "data.val_size": 16, "data.val_excluded_file": None, "data.image_size": side,
        "label_fractions": [], "finetune.per_fraction": {}, "finetune.label_fraction": 0.5,
        "supervised.lr_grid": [], "runtime.device": "cuda",
        # Step 2 of a rehearsal is a log point: its one read is allowed, there only.
        "runtime.log_every": 2, "runtime.checkpoint_every": 1000,
        **{f"{s}.batch_size": b for s, b in per_gpu.items()},
        **{f"model.{k}": v for k, v in (model or {}).items()}, **extra}
    return load_config(PRESETS / f"{name}.yaml", overrides)


def data_for(name: str, cfg: ExperimentConfig) -> tuple[int, int, int, int]:
    side, channels, classes, _ = PRESETS_GPU[name]
    # Enough images that the rehearsed steps (and a resume's) lie in one epoch: an
    # epoch's first step uploads its batch order, once (a sync allowed per epoch).
    n = 16 + 8 * max(cfg.pretrain.batch_size, cfg.distill.batch_size,
                     2 * cfg.finetune.batch_size, 2 * cfg.supervised.batch_size)
    return n, channels, side, classes


def as_preset_runs(name: str) -> dict:
    """How the preset's studies run a stage: compiled on one worker, eager on several."""
    workers = PRESETS_GPU[name][3]
    return {"compile": workers == 1, "world": workers}


def check_on_device(record, steps: int, saved: bool = True) -> None:
    assert record.steps == steps
    assert record.syncs == [], f"host syncs in the steady-state step: {record.syncs}"
    armed_due = [s for s in record.due if s >= 1]
    assert len(record.reads) <= len(armed_due), (record.reads, record.due)
    assert record.graph_breaks == 0, f"{record.graph_breaks} graph breaks"
    assert all(s == 0 for s in record.compiled_at), \
        f"recompiled after the first step: graphs compiled at steps {record.compiled_at}"
    assert record.cpu_ops == [], f"ops on CPU tensors in the step: {record.cpu_ops[:10]}"
    assert record.conv_dtypes == {torch.bfloat16}, record.conv_dtypes
    n_state = 0
    for key, obj in record.objects.items():
        for name, t in tensors_of(obj):
            assert t.device == fake_cuda.CUDA, f"{key}.{name} on {t.device}"
            if t.dim() == 4 and isinstance(obj, torch.nn.Module):
                assert t.is_contiguous(memory_format=torch.channels_last), f"{key}.{name}"
            n_state += name.startswith("state[")
    assert n_state > 0, "the optimiser took no step (no state on the device)"
    assert bool(record.saved) == saved, "a checkpoint was (not) written"


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS_GPU)
def test_pretraining_runs_on_the_gpu_as_planned_and_resumes_there(name, tmp_path):
    cfg = preset(name, **{"pretrain.epochs": 100})
    out = tmp_path / "pretrain"
    first = run_rehearsal("pretrain", cfg, out, data_for(name, cfg), steps=3,
                          **as_preset_runs(name))
    check_on_device(first, 3)
    assert bool(first.compiled_at) == as_preset_runs(name)["compile"]
    assert first.reads, "the log point at step 2 read nothing (is the tail watched?)"
    assert ("queue" in first.objects) == (cfg.pretrain.memory.queue_size > 0)
    # The same stage again resumes from the checkpoint, onto the device.
    again = run_rehearsal("pretrain", cfg, out, data_for(name, cfg), steps=2,
                          **as_preset_runs(name))
    assert again.resumed_from == 3
    check_on_device(again, 2)


# The widest, deepest and SK cells of the studies' grids (no checkpoint: 3 GB of zeros).
BIG = [("cifar10-gpu", {"depth": 50, "width": 1.0, "sk_ratio": 0.0625}),
       ("imagenet-gpu", {"depth": 152, "width": 2.0, "sk_ratio": 0.0625})]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "model"), BIG, ids=lambda v: str(v))
def test_the_largest_cells_pretrain_on_the_gpu(name, model, tmp_path):
    cfg = preset(name, model, **{"pretrain.epochs": 100})
    record = run_rehearsal("pretrain", cfg, tmp_path / "p", data_for(name, cfg), 2, save=False,
                           **as_preset_runs(name))
    check_on_device(record, 2, saved=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS_GPU)
def test_supervised_and_fine_tuning_run_on_the_gpu(name, tmp_path):
    cfg = preset(name, **{"supervised.epochs": 100, "supervised.min_steps": 0,
                          "finetune.epochs": 100, "finetune.min_steps": 0})
    side, channels, _, _ = PRESETS_GPU[name]
    record = run_rehearsal("supervised", cfg, tmp_path / "supervised", data_for(name, cfg), 3,
                           **as_preset_runs(name))
    check_on_device(record, 3)
    net = build_contrastive(cfg.model, cfg.head, channels, side)  # as pretraining saves it
    weights = {"encoder": net.encoder.state_dict(), "head": net.head.state_dict()}
    record = run_rehearsal("finetune", cfg, tmp_path / "finetune", data_for(name, cfg), 3, False,
                           weights, tmp_path / "pretrain", **as_preset_runs(name))
    check_on_device(record, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS_GPU)
def test_distillation_runs_on_the_gpu_with_its_teacher_there(name, tmp_path):
    cfg = preset(name, **{"distill.epochs": 100, "distill.alpha": 0.5})
    side, channels, classes, _ = PRESETS_GPU[name]
    # The teacher's weights as a checkpoint holds them (real CPU tensors).
    teacher = build_classifier(cfg.model, cfg.head, cfg.finetune.head_layer, channels, side,
                               classes)
    record = run_rehearsal("distill", cfg, tmp_path / "distill", data_for(name, cfg), 3, False,
                           {"classifier": teacher.state_dict()}, tmp_path / "teacher",
                           **as_preset_runs(name))
    check_on_device(record, 3)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_activation_checkpointing_rehearses_too(tmp_path, compile):
    cfg = preset("imagenet-gpu", **{"pretrain.epochs": 100})
    record = run_rehearsal("pretrain", cfg, tmp_path / "p", data_for("imagenet-gpu", cfg), 3, True,
                           save=False, compile=compile)
    check_on_device(record, 3, saved=False)
    assert bool(record.compiled_at) == compile


def test_distillation_with_checkpointing_reaches_its_first_compiled_step(tmp_path):
    """studies/distillation.py's cifar10-gpu lane (its settings, read from the study):
    one worker, compiled, checkpointed; a64a00c crashed here under compile."""
    from studies import distillation

    lane = distillation.STUDY.presets["cifar10-gpu"].set
    assert lane["runtime.activation_checkpointing"] is True
    cfg = preset("cifar10-gpu", **{"distill.epochs": 100, **lane})
    side, channels, classes, _ = PRESETS_GPU["cifar10-gpu"]
    teacher = build_classifier(cfg.model, cfg.head, cfg.finetune.head_layer, channels, side,
                               classes)
    record = run_rehearsal("distill", cfg, tmp_path / "d", data_for("cifar10-gpu", cfg), 2, True,
                           {"classifier": teacher.state_dict()}, tmp_path / "t", save=False,
                           compile=True)
    check_on_device(record, 2, saved=False)
    assert record.compiled_at == [0]


def test_flops_count_where_the_model_is_not():
    """The old order (a CPU model, a CUDA example) broke on its first step: the count
    now runs on meta stand-ins, for a model on the CPU and one on the (fake) GPU."""
    cfg = preset("cifar10-gpu")
    net = build_classifier(cfg.model, cfg.head, 1, 3, 32, 10)
    on_cpu = forward_flops_per_image(net, 3, 32)
    with fake_cuda.fake_cuda():
        Env(fake_cuda.CUDA).prepare(net)
        assert next(net.parameters()).device == fake_cuda.CUDA
        assert forward_flops_per_image(net, 3, 32) == on_cpu
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # a real forward
        build_classifier(cfg.model, cfg.head, 1, 3, 32, 10).eval()(torch.zeros(1, 3, 32, 32))
    assert on_cpu == counter.get_total_flops() > 2e9  # R50, small stem, 32 px


def test_the_old_flop_order_fails_the_rehearsal(tmp_path, monkeypatch):
    """The rehearsal catches the first GPU defect: counting FLOPs with a real forward
    of a CPU model on an example already on the GPU."""
    from scaling.stages import pretrain as stage
    from scaling.train.measure import eval_mode

    def old_count(model, channels, size):  # the old body: a real forward on the device
        example = torch.empty(1, channels, size, size, device=fake_cuda.CUDA)
        with eval_mode(model), FlopCounterMode(display=False) as counter:
            model(example)
        return int(counter.get_total_flops())

    monkeypatch.setattr(stage, "forward_flops_per_image", old_count)
    cfg = preset("cifar10-gpu", **{"pretrain.epochs": 100})
    with pytest.raises(RuntimeError, match="same device|device"):
        run_rehearsal("pretrain", cfg, tmp_path / "p", data_for("cifar10-gpu", cfg), 1)


def test_several_gpu_workers_run_the_global_bn_the_cpu_tests_run(monkeypatch):
    """With several workers on CUDA: the project's global BN (the gloo-tested code),
    no SyncBatchNorm, and DDP keeping its gradients as views into its buckets."""
    asked = {}

    def ddp(module, **kwargs):
        asked.update(kwargs)
        return module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    cfg = preset("imagenet-gpu")
    with fake_cuda.fake_cuda():
        net = fake_cuda.empty_module(lambda: build_classifier(cfg.model, cfg.head, 1, 3, 32, 10))
        Env(fake_cuda.CUDA, world=2).prepare(net, sync_bn=True)
    norms = [type(m).__name__ for m in net.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and set(norms) <= {"GlobalBatchNorm1d", "GlobalBatchNorm2d"}, set(norms)
    assert asked["gradient_as_bucket_view"] is True and asked["device_ids"] == [0]


def test_compile_only_on_one_gpu_worker():
    assert Env(fake_cuda.CUDA, compile=True).compiles
    assert not Env(fake_cuda.CUDA, world=2, compile=True).compiles  # DDP + SyncBN: eager
    assert not Env(torch.device("cpu"), compile=True).compiles


def test_global_bn_groups_skip_the_buffer_broadcast(tmp_path):
    """With global BN every worker's running statistics are equal: DDP's broadcast
    of buffers before each forward is waste; without it DDP keeps broadcasting."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        for sync_bn in (True, False):
            net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
            ddp = Env(torch.device("cpu"), world=2).prepare(net, sync_bn=sync_bn)
            assert ddp.broadcast_buffers is (not sync_bn)
    finally:
        dist.destroy_process_group()


def test_each_stage_starts_with_a_fresh_dynamo_cache(tiny, tmp_path, monkeypatch):
    """A lane compiles many architectures in one process; Dynamo's recompile limit
    would otherwise turn compilation off silently after about 8."""
    import torch._dynamo

    from scaling.configure import with_overrides
    from scaling.runtime.local import run_local

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    cfg = with_overrides(tiny, {"pretrain.epochs": 1, "runtime.compile": True})
    run_local("pretrain", cfg, tmp_path / "p", None)
    run_local("pretrain", with_overrides(cfg, {"runtime.compile": False}), tmp_path / "p", None)
    assert resets == [1]


def small(name: str, **extra: object) -> ExperimentConfig:
    """The preset's networks (depth, SK, stem, head, queue) at 1/16 width on 32 px
    synthetic images, on the CPU: a real backward in about a second a stage."""
    return load_config(PRESETS / f"{name}.yaml", {
        "data.name": "synthetic", "data.image_size": 32, "data.val_size": 16,
        "data.val_excluded_file": None, "model.width": 0.0625, "label_fractions": [],
        "finetune.per_fraction": {}, "finetune.label_fraction": 0.5, "finetune.min_steps": 0,
        "supervised.lr_grid": [], "supervised.min_steps": 0, "runtime.device": "cpu",
        "pretrain.memory.queue_size": 64 if "imagenet" in name else 0, "distill.alpha": 0.5,
        **{f"{s}.batch_size": 16 for s in ("pretrain", "finetune", "distill", "supervised")},
        **extra})


def input_weights(cfg: ExperimentConfig, stage: str) -> dict | None:
    """What the input stage's final/model.pt would hold (real, fresh CPU weights)."""
    if stage == "finetune":
        net = build_contrastive(cfg.model, cfg.head, 1, 32)
        return {"encoder": net.encoder.state_dict(), "head": net.head.state_dict()}
    if stage == "distill":
        teacher = build_classifier(cfg.model, cfg.head, cfg.finetune.head_layer, 1, 32, 4)
        return {"classifier": teacher.state_dict()}
    return None


STAGES = ["pretrain", "finetune", "distill", "supervised"]


@pytest.mark.parametrize("stage", STAGES)
def test_the_backward_reads_nothing_to_the_host(stage, tmp_path):
    """Each stage's real backward on the CPU as rank 0 of two workers, with activation
    checkpointing: the recomputation, BN's and the gather's backward all run, and
    none reads a value (each read would be a host sync per step on a GPU)."""
    cfg = small("imagenet-gpu")
    found, ops = rehearse_backward(stage, cfg, tmp_path / stage, 2, input_weights(cfg, stage),
                                   *([tmp_path / "in"] if input_weights(cfg, stage) else []))
    assert found == [], f"host reads in the backward: {found}"
    assert "aten.convolution.default" in ops, "no recomputation ran in the backward"
    assert "c10d.allreduce_.default" in ops, "global BN's backward did not run"
    if stage == "pretrain":  # the gathered negatives' backward
        assert "c10d.alltoall_.default" in ops, sorted(o for o in ops if "c10d" in o)


# Each kind of defect the rehearsal claims to catch, planted: the rehearsal must fail.

def test_a_copy_to_the_host_in_the_steps_tail_fails_the_rehearsal(tmp_path, monkeypatch):
    original = StageRun.after_step

    def mutated(self, loss, lr, images):
        loss.detach().float().cpu()  # e.g. logging the loss every step
        original(self, loss, lr, images)

    monkeypatch.setattr(StageRun, "after_step", mutated)
    cfg = preset("cifar10-gpu", **{"pretrain.epochs": 100})
    record = run_rehearsal("pretrain", cfg, tmp_path / "p", data_for("cifar10-gpu", cfg), 3,
                           save=False)  # the tail is eager code: no need to compile here
    assert any("_to_copy" in s for s in record.syncs), record.syncs
    with pytest.raises(AssertionError, match="host syncs"):
        check_on_device(record, 3, saved=False)


def test_a_host_read_in_the_recomputation_fails_the_backward_rehearsal(tmp_path, monkeypatch):
    from scaling.model import resnet

    original = resnet._frozen_bn_statistics

    @contextlib.contextmanager
    def mutated(module):
        with original(module):
            for m in module.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    int(m.num_batches_tracked)  # e.g. a check that reads the count
            yield

    monkeypatch.setattr(resnet, "_frozen_bn_statistics", mutated)
    found, _ = rehearse_backward("pretrain", small("cifar10-gpu"), tmp_path / "p", 2)
    assert any("_local_scalar_dense" in f for f in found), found


def test_a_cpu_index_in_the_augmentation_fails_the_rehearsal(tmp_path, monkeypatch):
    from scaling.stages import pretrain as stage

    original = stage.augment_views

    def mutated(x, *args, **kwargs):
        x = x[torch.randperm(len(x))]  # an index drawn on the host
        return original(x, *args, **kwargs)

    monkeypatch.setattr(stage, "augment_views", mutated)
    cfg = preset("cifar10-gpu", **{"pretrain.epochs": 100})
    record = run_rehearsal("pretrain", cfg, tmp_path / "p", data_for("cifar10-gpu", cfg), 3,
                           save=False)  # the augmentation is eager code
    assert record.cpu_ops or record.syncs
    with pytest.raises(AssertionError, match="host syncs|CPU tensors"):
        check_on_device(record, 3, saved=False)
