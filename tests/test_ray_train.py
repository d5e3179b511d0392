"""Stages on Ray Train call the same stage code as the single-process path."""

import pytest
import torch
from tolerance import assert_close_at_scale

from scaling import stage_result
from scaling.configure import with_overrides
from scaling.model.network import build_contrastive
from scaling.stage_result import load_final_models

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def losses(result):
    return [p["loss"] for p in result["history"]]


@pytest.mark.slow
def test_one_ray_worker_reproduces_the_single_process_run(ray_local, tiny, tmp_path):
    from scaling.runtime.ray_train import run_stage

    cfg = with_overrides(tiny, {"pretrain.epochs": 1, "runtime.log_every": 1,
                                "data.val_size": 0})
    on_ray = run_stage("pretrain", cfg, tmp_path / "ray")
    # Ray gives its worker one CPU thread; match it so float reductions agree.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_stage("pretrain", cfg, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    assert on_ray["world_size"] == 1 and on_ray["step"] == local["step"] == 8
    assert losses(on_ray) == pytest.approx(losses(local), abs=1e-4)
    a, b = load_final_models(tmp_path / "ray"), load_final_models(tmp_path / "local")
    for k, v in a["encoder"].items():
        assert_close_at_scale(v.float(), b["encoder"][k].float(), 1e-4, k)
    # Ray registered the stage's checkpoints, and a second call returns the result.
    assert list((tmp_path / "_ray" / "ray").glob("ray@checkpoints@step-*"))
    assert run_stage("pretrain", cfg, tmp_path / "ray") == on_ray


@pytest.mark.slow
def test_two_workers_compute_what_one_worker_computes(ray_local, tiny, tmp_path):
    """2 workers x B/2 == 1 worker x B: gathered negatives, global BN, sharded views.

    One SGD step on the whole synthetic set (batch 256): equal losses, and equal
    weight updates (= lr x gradient, from the same initial weights) for every
    parameter, mean the loss and the gradients were the same.
    """
    from scaling.runtime.ray_train import run_stage

    cfg = with_overrides(tiny, {
        "pretrain.epochs": 1, "pretrain.batch_size": 256, "runtime.log_every": 1,
        "data.val_size": 0,  # the whole synthetic set in one batch
        "pretrain.optim": {"name": "sgd", "base_lr": 1.0, "lr_scaling": "linear",
                           "momentum": 0.0, "weight_decay": 0.0, "warmup_fraction": 0.0},
    })
    one = run_stage("pretrain", cfg, tmp_path / "one")
    two = run_stage("pretrain", with_overrides(cfg, {"runtime.workers": 2}), tmp_path / "two")
    assert two["world_size"] == 2 and two["step"] == one["step"] == 1
    assert losses(two)[0] == pytest.approx(losses(one)[0], rel=1e-5, abs=1e-5)
    torch.manual_seed(cfg.seed)
    init = build_contrastive(cfg.model, cfg.head, 1, 16).state_dict()
    a, b = load_final_models(tmp_path / "one"), load_final_models(tmp_path / "two")
    moved = 0
    for part in ("encoder", "head"):
        for k, v in a[part].items():
            if not v.is_floating_point() or "running" in k:
                continue
            step_one = v - init[f"{part}.{k}"]
            step_two = b[part][k] - init[f"{part}.{k}"]
            # At the tensor's scale: an element-wise rtol fails on near-zero steps
            # whenever the two reductions' orders differ (AVX2 vs AVX-512, GPUs).
            # 1e-4: the stem's gradient comes back through every layer's float32
            # sums (seen: 1.2e-5 of its largest step); a wrong split is O(1).
            assert_close_at_scale(step_two, step_one, 1e-4, k)
            moved += int(step_one.abs().max() > 1e-4)
    assert moved > 20  # most tensors really moved: the comparison is not vacuous


@pytest.mark.slow
def test_a_chain_runs_on_one_worker_group_and_each_stage_keeps_its_own_state(
        ray_local, tiny, tmp_path):
    """pretrain -> finetune -> distill -> supervised (an LR grid) on one 2-worker
    TorchTrainer: the same workers run every stage (one start-up), each stage directory holds
    its own result, and Ray's copy of a checkpoint names its stage and its place
    there: with the last grid run's local state gone (a fresh node), running the
    chain again restores that checkpoint into that run and trains nothing."""
    import os
    import shutil

    from scaling.runtime.local import pipeline_jobs
    from scaling.runtime.ray_train import run_stages

    cfg = with_overrides(tiny, {
        "label_fractions": [0.5], "pretrain.epochs": 1, "finetune.epochs": 1,
        "distill.epochs": 1, "supervised.epochs": 1, "supervised.lr_grid": [0.05, 0.1],
        "runtime.workers": 2})
    jobs = pipeline_jobs(cfg, tmp_path / "runs")
    log = tmp_path / "finished.log"

    def after(job, result):  # runs in the worker, on rank 0
        with log.open("a") as f:
            f.write(f"{os.getpid()} {job.stage} {result['stage']}\n")

    results = run_stages(jobs, "chain", after=after)
    stages = ["pretrain", "finetune", "distill", "supervised", "pixels"]
    assert [r["stage"] for r in results] == stages
    marks = [line.split() for line in log.read_text().splitlines()]
    # Each stage finished once, in one rank 0 process: no second group (rank 1 once
    # started fine-tuning before rank 0 had written pretraining's result.json, and
    # the group restarted and ran through pretraining's result again).
    assert [(s, r) for _, s, r in marks] == list(zip(stages, stages, strict=True))
    assert len({pid for pid, _, _ in marks}) == 1 and int(marks[0][0]) != os.getpid()
    for job, result in zip(jobs, results, strict=True):
        assert result["stage"] == job.stage and (job.out / "result.json").exists()
    # Ray kept the latest checkpoints, named by stage and place: the grid's last run.
    sup = jobs[3]  # the baseline with its LR grid (the pixel arm trains nothing)
    grid_run = sup.out / "lr-0.1"
    kept = (tmp_path / "runs" / "_ray" / "chain").glob(
        f"{sup.out.name}@lr-0.1@checkpoints@step-*")
    assert list(kept)
    shutil.rmtree(grid_run)
    (sup.out / "result.json").unlink()
    again = run_stages(jobs, "chain")
    resumed = stage_result.read_local_result(grid_run)
    assert resumed is not None and resumed["resumed_from"] == resumed["step"]
    assert again[:3] == results[:3]
    assert again[3]["model_sha256"] == results[3]["model_sha256"]


@pytest.mark.slow
def test_killed_driver_resumes_when_the_command_is_run_again(tmp_path):
    """SIGKILL the CLI driver (`--ray`) mid-pretraining; the same command resumes."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parent.parent
    cfg = yaml.safe_load((repo / "configs" / "tiny.yaml").read_text())
    cfg["label_fractions"] = [0.5]
    cfg["pretrain"].update(epochs=4, batch_size=16)
    for stage in ("finetune", "distill", "supervised"):  # only pretraining is killed
        cfg[stage]["epochs"] = 1
    cfg["data"]["val_size"] = 0  # all 256 images: 16 steps an epoch
    cfg["runtime"] = {"device": "cpu", "checkpoint_every": 4, "log_every": 4}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "scaling.pipeline", str(path), "--out",
               str(tmp_path / "runs"), "--ray"]
    from study_runs import orphans_gone, ray_workers

    ray_before = set(ray_workers())
    first = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    steps: list[int] = []
    while time.monotonic() < deadline and not steps:
        steps = [int(p.name.split("-")[1])
                 for p in (tmp_path / "runs").glob("tiny/pretrain-*/checkpoints/step-*")]
        assert first.poll() is None
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    pre = next((tmp_path / "runs").glob("tiny/pretrain-*"))
    assert not (pre / "result.json").exists()
    orphans_gone(ray_before)  # the orphaned worker notices its driver is gone, and ends
    second = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = yaml.safe_load((pre / "result.json").read_text())
    print("driver killed; resumed from step", result["resumed_from"], "of", result["step"])
    assert result["step"] == 64 and result["resumed_from"] is not None
    assert result["resumed_from"] >= min(steps)
    assert "stage results" in second.stdout


@pytest.mark.slow
def test_nan_on_two_workers_stops_both_without_retries(ray_local, tiny, tmp_path):
    from scaling.runtime.ray_train import run_stage
    from scaling.stages.stage_run import NonFiniteLoss

    cfg = with_overrides(tiny, {
        "pretrain.optim": {"name": "sgd", "base_lr": 1e30, "warmup_fraction": 0.0},
        "runtime.workers": 2, "runtime.max_failures": 3, "runtime.checkpoint_every": 1,
    })
    with pytest.raises(NonFiniteLoss, match="Last good checkpoint"):
        run_stage("pretrain", cfg, tmp_path / "nan")
    assert not (tmp_path / "nan" / "result.json").exists()
