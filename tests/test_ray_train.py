"""Stages on Ray Train call the same stage code as the single-process path."""

import pytest
import torch

from scaling.checkpoint import load_final_models
from scaling.config import with_overrides
from scaling.pretrain import pretrain

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def losses(result):
    return [p["loss"] for p in result["history"]]


def test_one_ray_worker_reproduces_the_single_process_run(ray_local, tiny, tmp_path):
    from scaling.ray_train import run_stage

    cfg = with_overrides(tiny, {"pretrain.epochs": 1, "runtime.log_every": 1})
    on_ray = run_stage("pretrain", cfg, tmp_path / "ray")
    # Ray gives its worker one CPU thread; match it so float reductions agree.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = pretrain(cfg, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    assert on_ray["world_size"] == 1 and on_ray["step"] == local["step"] == 8
    assert losses(on_ray) == pytest.approx(losses(local), abs=1e-4)
    a, b = load_final_models(tmp_path / "ray"), load_final_models(tmp_path / "local")
    for k, v in a["encoder"].items():
        assert torch.allclose(v.float(), b["encoder"][k].float(), atol=1e-4), k
    # Ray registered the stage's checkpoints, and a second call returns the result.
    assert list((tmp_path / "_ray" / "ray").glob("step-*"))
    assert run_stage("pretrain", cfg, tmp_path / "ray") == on_ray


def test_two_workers_split_the_global_batch(ray_local, tiny, tmp_path):
    from scaling.ray_train import run_stage

    cfg = with_overrides(tiny, {"pretrain.epochs": 1, "runtime.log_every": 1,
                                "runtime.workers": 2})
    result = run_stage("pretrain", cfg, tmp_path / "two")
    # Same global batch, so the same number of steps as one worker; every image
    # counted once per step across both workers.
    assert result["world_size"] == 2 and result["step"] == 8
    assert len(result["history"]) == 8
    assert result["metrics"]["knn_top1"] > 0
