"""Every stage end to end on tiny synthetic data, and the stage contract."""

import json

import numpy as np
import pytest
import torch

from scaling.configure import with_overrides
from scaling.data.batches import epoch_batches
from scaling.model.network import build_contrastive
from scaling.pipeline import summary
from scaling.runtime.local import run_pipeline
from scaling.stage_result import load_final_models, read_local_result
from scaling.stages.checkpoint import latest_checkpoint
from scaling.stages.registry import STAGES, stage_dir, stage_key
from scaling.stages.registry import run as run_stage
from scaling.stages.stage_run import NonFiniteLoss


def test_pipeline_end_to_end_and_rerun_reuses(tiny, tmp_path):
    results = run_pipeline(tiny, tmp_path)
    assert [r["stage"] for r in results] == ["pretrain"] + ["finetune", "distill",
                                                            "supervised", "pixels"] * 2
    for r in results:  # the registry lists what each stage reports: results.csv's columns
        assert set(r["metrics"]) == set(STAGES[r["stage"]].metrics), r["stage"]
    pre = results[0]
    for key in ("knn_top1", "linear_top1", "images_per_s", "wall_seconds", "params",
                "forward_flops_per_image", "peak_memory_bytes"):
        assert pre["metrics"][key] > 0, key
    # 224 training images (256 less 32 for validation) / batch 32 x 2 epochs.
    assert pre["history"] and pre["history"][-1]["step"] == pre["step"] == 14
    for key in ("knn_val_top1", "linear_val_top1"):
        assert 0 < pre["metrics"][key] <= 1, key
    # Raw pixels through the same probes: computed once, cached beside the stage runs.
    (cache,) = stage_dir(tmp_path, tiny, "pretrain").parent.glob("pixels-*.json")
    assert json.loads(cache.read_text())["linear_val_top1"] == pre["metrics"][
        "pixel_linear_val_top1"] > 0.25  # 4 classes
    for r in results[1:]:
        assert 0 <= r["metrics"]["test_top1"] <= 1
        assert 0 <= r["metrics"]["val_top1"] <= 1
        for key in ("stem", "batch_size", "epochs", "subset_seed", "probe", "head_layer"):
            assert key in r["protocol"] or r["stage"] in ("distill", "pixels"), key
    ft = results[1]
    assert ft["protocol"]["label_fraction"] == 0.1 and ft["protocol"]["head_layer"] == 1
    labels = np.loadtxt(stage_dir(tmp_path, with_overrides(
        tiny, {"finetune.label_fraction": 0.1}), "finetune") / "labels.txt")
    # 4 classes x round(0.1 x 56): the 224 images outside the 32 of validation
    assert len(labels) == ft["metrics"]["labelled_examples"] == 24
    # Pretraining is shared by both fractions: one pretrain directory only.
    assert len(list(tmp_path.glob("pretrain-*"))) == 1
    assert "finetune" in summary(results)

    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    again = run_pipeline(tiny, tmp_path)
    assert again == results
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")} == stamps


def test_the_same_seed_on_the_same_machine_gives_the_same_models(tiny, tmp_path):
    """Determinism on one machine and thread count: two runs from scratch write
    byte-identical models. (Across CPUs or thread counts they need not:
    bench/reproducibility.py measures how far a cell moves, docs/results.md.)"""
    first = run_pipeline(tiny, tmp_path / "a")
    second = run_pipeline(tiny, tmp_path / "b")
    for a, b in zip(first, second, strict=True):
        assert a["model_sha256"] == b["model_sha256"], a["stage"]
        assert a["metrics"].get("top1") == b["metrics"].get("top1"), a["stage"]
    other = run_pipeline(with_overrides(tiny, {"seed": 1}), tmp_path / "c")
    assert other[0]["model_sha256"] != first[0]["model_sha256"]  # the seed matters


def test_stage_keys_follow_dependencies(tiny):
    a = with_overrides(tiny, {"finetune.label_fraction": 0.1})
    b = with_overrides(tiny, {"finetune.label_fraction": 0.5})
    assert stage_key(a, "pretrain") == stage_key(b, "pretrain")
    assert stage_key(a, "finetune") != stage_key(b, "finetune")
    assert stage_key(a, "supervised") != stage_key(b, "supervised")
    c = with_overrides(a, {"distill.temperature": 0.1, "runtime.log_every": 1})
    assert stage_key(a, "finetune") == stage_key(c, "finetune")
    assert stage_key(a, "distill") != stage_key(c, "distill")
    d = with_overrides(a, {"pretrain.epochs": 3})
    assert stage_key(a, "supervised") == stage_key(d, "supervised")
    assert stage_key(a, "finetune") != stage_key(d, "finetune")


def test_finetune_starts_from_pretrained_head_layer(tiny, tmp_path):
    cfg = with_overrides(tiny, {"finetune.epochs": 1, "finetune.head_layer": 2})
    pre = tmp_path / "pre"
    run_stage("pretrain", cfg, pre)
    weights = load_final_models(pre)
    # Zero learning rate: the fine-tuned network must still be the pretrained one.
    frozen = with_overrides(cfg, {"finetune.optim.base_lr": 1e-30})
    result = run_stage("finetune", frozen, tmp_path / "ft", pre)
    clf = load_final_models(tmp_path / "ft")["classifier"]
    for k, v in weights["encoder"].items():
        if "running" in k or "num_batches" in k:
            continue  # BN statistics keep updating in train mode
        assert torch.allclose(clf[f"encoder.{k}"], v), k
    # Head layers 1 and 2 kept (with a ReLU between), classifier on a 32-d output.
    assert torch.allclose(clf["head.0.0.weight"], weights["head"]["layers.0.0.weight"])
    assert torch.allclose(clf["head.2.0.weight"], weights["head"]["layers.1.0.weight"])
    assert clf["classifier.weight"].shape == (4, 16)
    assert result["protocol"]["head_layer"] == 2


def test_distill_to_smaller_student_on_other_unlabelled_data(tiny, tmp_path):
    cfg = with_overrides(tiny, {
        "distill.student": {"depth": 18, "width": 0.03125},
        "distill.unlabelled": {"name": "synthetic", "image_size": 24},
        "distill.alpha": 0.5,
    })
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    run_stage("pretrain", cfg, pre)
    run_stage("finetune", cfg, ft, pre)
    r = run_stage("distill", cfg, tmp_path / "ds", ft)
    assert r["protocol"]["self_distillation"] is False
    assert r["protocol"]["student"]["width"] == 0.03125
    teacher_params = read_local_result(ft)["metrics"]["params"]
    assert r["metrics"]["params"] < teacher_params
    assert 0 <= r["metrics"]["teacher_test_top1"] <= 1


def test_supervised_learns_synthetic_classes(tiny, tmp_path):
    cfg = with_overrides(tiny, {"finetune.label_fraction": 1.0, "supervised.epochs": 8,
                                "supervised.batch_size": 32, "supervised.optim.base_lr": 2.0})
    r = run_stage("supervised", cfg, tmp_path / "sup")
    assert r["metrics"]["test_top1"] > 0.5  # 4 classes: chance is 0.25
    assert r["protocol"]["head_layer"] == 0


def test_memory_queue_pretraining_checkpoints_the_queue(tiny, tmp_path):
    cfg = with_overrides(tiny, {"pretrain.memory.queue_size": 48, "pretrain.epochs": 1})
    r = run_stage("pretrain", cfg, tmp_path / "pre")
    state, meta = latest_checkpoint(tmp_path / "pre")
    assert int(state["queue"]["filled"]) == 48  # 8 steps x 64 keys, capped at 48
    assert "momentum" in state and r["protocol"]["queue_size"] == 48


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    cfg = with_overrides(tiny, {
        "pretrain.optim": {"name": "sgd", "base_lr": 1e30, "warmup_fraction": 0.0},
        "runtime.checkpoint_every": 1,
    })
    with pytest.raises(NonFiniteLoss, match="Last good checkpoint: .*step-0000000"):
        run_stage("pretrain", cfg, tmp_path / "pre")
    assert read_local_result(tmp_path / "pre") is None
    state, meta = latest_checkpoint(tmp_path / "pre")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_batches_shard_the_single_worker_batch():
    idx = np.arange(100)
    one = epoch_batches(idx, 20, seed=1, epoch=3)
    two = [epoch_batches(idx, 20, seed=1, epoch=3, rank=r, world=2) for r in range(2)]
    for b, (a0, a1) in enumerate(zip(*two, strict=True)):
        assert np.array_equal(np.concatenate([a0, a1]), one[b])
    assert not np.array_equal(one[0], epoch_batches(idx, 20, seed=1, epoch=4)[0])
    with pytest.raises(ValueError, match="batch_size=200"):
        epoch_batches(idx, 200, seed=0, epoch=0)


def test_labelled_batches_are_one_global_batch_shared_by_the_workers(tiny):
    # Distillation's labelled term (alpha > 0) draws a global batch by (seed, step):
    # the workers' shares make up the single worker's batch, and a resume redraws it.
    from scaling.stages.distill import labelled_batch
    from scaling.train.env import Env

    labelled = np.arange(100, 300)
    cpu = torch.device("cpu")
    one = labelled_batch(tiny, labelled, 7, Env(cpu))
    shares = [labelled_batch(tiny, labelled, 7, Env(cpu, rank=r, world=2)) for r in (0, 1)]
    assert len(one) == tiny.distill.batch_size and set(one) <= set(labelled)
    assert np.array_equal(np.concatenate(shares), one)
    assert np.array_equal(labelled_batch(tiny, labelled, 7, Env(cpu)), one)
    assert not np.array_equal(labelled_batch(tiny, labelled, 8, Env(cpu)), one)


def test_result_format_is_json_with_config(tiny, tmp_path):
    run_stage("pretrain", with_overrides(tiny, {"pretrain.epochs": 1}), tmp_path / "pre")
    data = json.loads((tmp_path / "pre" / "result.json").read_text())
    assert data["config"]["model"]["depth"] == 18
    assert len(data["model_sha256"]) == 64
    net = build_contrastive(tiny.model, tiny.head, 1, 16)
    net.encoder.load_state_dict(load_final_models(tmp_path / "pre")["encoder"])
