"""The protocol around the maths: splits, per-fraction settings, step budgets, the
paper's distillation, global BN, full-image crops, the official subset lists, STL-10."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.collect import _student
from scaling.config import ConfigError
from scaling.configure import PRESETS, fraction_configs, load_config, with_overrides
from scaling.data import datasets as data_mod
from scaling.data.batches import Crops, Fetcher
from scaling.data.datasets import PROJECT, DataError, FolderImages, ImageData, subset_from_file
from scaling.data.splits import (
    Splits,
    labelled_subset,
    load_splits,
    schedule_epochs,
    unlabelled_pool,
    validation_split,
)
from scaling.pipeline import main
from scaling.stages.registry import run as run_stage
from scaling.stages.registry import stage_key
from scaling.study.plan import cells, make_study
from scaling.train.env import Env

# --- validation split ---------------------------------------------------------


def test_validation_split_is_balanced_exact_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 600)
    rest, val = validation_split(labels, 600, seed=0)
    assert np.bincount(labels[val]).tolist() == [60] * 10
    assert np.intersect1d(rest, val).size == 0 and len(rest) + len(val) == 6000
    assert np.array_equal(val, validation_split(labels, 600, seed=0)[1])
    assert not np.array_equal(val, validation_split(labels, 600, seed=1)[1])
    # Unequal classes: in proportion, and exactly the size asked for.
    skewed = np.array([0] * 90 + [1] * 10)
    _, v = validation_split(skewed, 10, seed=0)
    assert np.bincount(skewed[v]).tolist() == [9, 1]
    _, v = validation_split(skewed, 7, seed=0, excluded=np.arange(50))
    assert len(v) == 7 and v.min() >= 50
    assert len(validation_split(labels, 0, seed=0)[1]) == 0
    with pytest.raises(ConfigError, match=r"data.val_size=6000 .*allowed: 0..5999"):
        validation_split(labels, 6000, seed=0)


def test_labels_pretraining_and_validation_never_overlap(tiny):
    splits = load_splits(tiny.data)
    assert len(splits.val) == 32
    assert np.bincount(splits.train.labels[splits.val]).tolist() == [8] * 4
    for fraction in (0.1, 1.0):
        cfg = with_overrides(tiny, {"finetune.label_fraction": fraction})
        assert np.intersect1d(labelled_subset(cfg, splits), splits.val).size == 0
    pool, idx = unlabelled_pool(tiny.data, splits)
    assert pool is splits.train and np.array_equal(idx, splits.rest)
    full = with_overrides(tiny, {"finetune.label_fraction": 1.0})
    assert np.array_equal(labelled_subset(full, splits), splits.rest)


def test_a_subset_file_that_reaches_into_validation_is_refused(tiny, tmp_path):
    splits = load_splits(tiny.data)
    (tmp_path / "labels.txt").write_text(f"{splits.rest[0]}\n{splits.val[0]}\n")
    cfg = with_overrides(tiny, {"finetune.subset_file": str(tmp_path / "labels.txt")})
    with pytest.raises(DataError, match="1 of its images are in the validation split.*"
                                        "data.val_excluded_file"):
        labelled_subset(cfg, splits)
    excluded = with_overrides(cfg, {"data.val_excluded_file": str(tmp_path / "labels.txt")})
    s2 = load_splits(excluded.data)
    assert labelled_subset(excluded, s2).tolist() == sorted([splits.rest[0], splits.val[0]])


def test_too_large_a_validation_split_stops_the_command(tmp_path, capsys):
    code = main(["tiny", "--out", str(tmp_path), "--set", "data.val_size=300",
                 "runtime.device=cpu"])
    assert code == 2
    assert "data.val_size=300 is invalid; allowed: 0..255" in capsys.readouterr().err
    assert not list(tmp_path.rglob("result.json"))


def test_no_validation_split_reports_none(tiny, tmp_path):
    cfg = with_overrides(tiny, {"data.val_size": 0, "supervised.epochs": 1})
    r = run_stage("supervised", cfg, tmp_path / "sup")
    assert r["metrics"]["val_top1"] is None and r["protocol"]["val_size"] == 0


# --- per-fraction fine-tuning and step budgets -----------------------------------


def test_per_fraction_settings_resolve_and_key_each_fraction_alone(tiny):
    per = {0.1: {"head_layer": 2, "epochs": 7}, 0.5: {"base_lr": 0.3, "min_steps": 40}}
    cfg = with_overrides(tiny, {"finetune.per_fraction": per})
    by = {c.finetune.label_fraction: c for c in fraction_configs(cfg)}
    assert (by[0.1].finetune.head_layer, by[0.1].finetune.epochs) == (2, 7)
    assert by[0.1].finetune.optim.base_lr == tiny.finetune.optim.base_lr
    assert (by[0.5].finetune.optim.base_lr, by[0.5].finetune.min_steps) == (0.3, 40)
    assert by[0.5].finetune.head_layer == tiny.finetune.head_layer
    assert all(c.finetune.per_fraction == {} for c in by.values())
    # Changing the 10% settings leaves the 50% stages' keys alone.
    other = with_overrides(tiny, {"finetune.per_fraction": {**per, 0.1: {"epochs": 8}}})
    assert stage_key(fraction_configs(other)[1], "finetune") == stage_key(by[0.5], "finetune")


def test_bad_per_fraction_keys_are_named(tiny):
    with pytest.raises(ConfigError, match=r"finetune.per_fraction\[0.05\]=0.05 .*label_fractions"):
        with_overrides(tiny, {"finetune.per_fraction": {0.05: {"epochs": 3}}})
    with pytest.raises(ConfigError, match=r"finetune.per_fraction\[0.1\].epoch=3 .*known keys"):
        with_overrides(tiny, {"finetune.per_fraction": {0.1: {"epoch": 3}}})
    with pytest.raises(ConfigError, match=r"per_fraction\['one'\].*a number as the key"):
        with_overrides(tiny, {"finetune.per_fraction": {"one": {"epochs": 3}}})
    with pytest.raises(ConfigError, match=r"per_fraction\[0.1\].head_layer=3 .*num_layers \(2\)"):
        with_overrides(tiny, {"finetune.per_fraction": {0.1: {"head_layer": 3}}})


def test_gpu_presets_fine_tune_as_the_paper_per_fraction():
    for name in ("cifar10-gpu", "imagenet-gpu"):
        cfgs = fraction_configs(load_config(PRESETS / f"{name}.yaml"))
        got = [(c.finetune.label_fraction, c.finetune.head_layer, c.finetune.epochs)
               for c in cfgs]
        assert got == [(0.01, 1, 60), (0.1, 1, 30), (1.0, 0, 30)], name
    imagenet = fraction_configs(load_config(PRESETS / "imagenet-gpu.yaml"))
    assert [c.finetune.subset_file for c in imagenet] == [
        "subsets/imagenet/1percent.txt", "subsets/imagenet/10percent.txt", None]


def test_a_study_axis_wins_over_per_fraction_settings(tiny):
    base = with_overrides(tiny, {"finetune.per_fraction": {0.1: {"head_layer": 1, "epochs": 5}}})
    study = make_study("s", base, {"ft_layer": [0, 2], "label_fraction": [0.1]})
    got = [(c.config.finetune.head_layer, c.config.finetune.epochs) for c in cells(study)]
    assert got == [(0, 5), (2, 5)]


def test_min_steps_grow_the_schedule_in_whole_epochs(tiny, tmp_path):
    assert schedule_epochs(60, 500, 2) == 250 and schedule_epochs(60, 0, 2) == 60
    assert schedule_epochs(3, 10, 4) == 3
    # 24 labels at batch 16: one step an epoch, so 9 steps take 9 epochs.
    cfg = with_overrides(tiny, {"finetune.label_fraction": 0.1, "supervised.epochs": 1,
                                "supervised.min_steps": 9, "supervised.batch_size": 16})
    r = run_stage("supervised", cfg, tmp_path / "sup")
    assert r["step"] == 9 and r["protocol"]["epochs"] == 9 and r["protocol"]["steps"] == 9


# --- distillation and global BN -------------------------------------------------------


def test_distillation_defaults_are_the_papers(tiny):
    assert tiny.self_distillation and tiny.distill_temperature() == 0.1
    assert tiny.distill_optim() == tiny.pretrain.optim
    written_out = with_overrides(tiny, {"distill.student": dataclasses.asdict(tiny.model)})
    assert written_out.self_distillation and written_out.distill_temperature() == 0.1
    smaller = with_overrides(tiny, {"distill.student": {"depth": 18, "width": 0.03125}})
    assert not smaller.self_distillation and smaller.distill_temperature() == 1.0
    assert with_overrides(smaller, {"distill.temperature": 2.0}).distill_temperature() == 2.0


def test_every_stage_uses_global_bn_and_the_student_has_no_head(tiny, tmp_path, monkeypatch):
    asked = []
    prepare = Env.prepare

    def spy(self, model, sync_bn=False):
        asked.append(sync_bn)
        return prepare(self, model, sync_bn)

    monkeypatch.setattr(Env, "prepare", spy)
    cfg = with_overrides(tiny, {"pretrain.epochs": 1, "finetune.epochs": 1,
                                "distill.epochs": 1, "supervised.epochs": 1,
                                "distill.student": dataclasses.asdict(tiny.model)})
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    run_stage("pretrain", cfg, pre)
    run_stage("finetune", cfg, ft, pre)
    r = run_stage("distill", cfg, tmp_path / "ds", ft)
    run_stage("supervised", cfg, tmp_path / "sup")
    assert asked == [True] * 4
    p = r["protocol"]
    assert p["self_distillation"] is True and p["temperature"] == 0.1
    assert p["optimizer"] == "lars" and p["base_lr"] == tiny.pretrain.optim.base_lr
    from scaling.stage_result import load_final_models

    student = load_final_models(tmp_path / "ds")["classifier"]
    assert not [k for k in student if k.startswith("head.")]
    assert student["classifier.weight"].shape == (4, 32)  # the encoder's 512 x 1/16 features
    assert 0 <= r["metrics"]["val_top1"] <= 1 and 0 <= r["metrics"]["teacher_val_top1"] <= 1


def test_the_report_calls_an_equal_student_self_distillation():
    row = {"model.depth": 50, "model.width": 1.0, "model.sk_ratio": 0.0, "model.stem": "auto",
           "distill.student.depth": 50.0, "distill.student.width": 1.0,
           "distill.student.sk_ratio": 0.0, "distill.student.stem": "auto"}
    assert _student(pd.Series(row)) == "self"
    assert _student(pd.Series({**row, "distill.student.depth": 18.0})) == "R18 1x"
    assert _student(pd.Series({**row, "distill.student.depth": None})) == "self"


# --- ImageNet-style folders -------------------------------------------------------------


def _three_bands(root, n=6, width=96, height=32):
    """Images whose central square is green and whose sides are red and blue."""
    from PIL import Image

    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGB", (width, height), (0, 255, 0))
            img.paste((255, 0, 0), (0, 0, width // 3, height))
            img.paste((0, 0, 255), (2 * width // 3, 0, width, height))
            img.save(root / "train" / c / f"{c}_{i}.png")


def test_training_crops_come_from_the_full_image_and_eval_is_the_centre(tmp_path):
    _three_bands(tmp_path)
    ds = FolderImages(tmp_path / "train", 16, "imagefolder")
    centre, _ = ds[0]
    assert centre.shape == (3, 16, 16) and (centre[1] == 255).all() and (centre[0] == 0).all()
    crops, label = ds[(0, 123, 40, (0.08, 1.0), (3 / 4, 4 / 3))]
    assert crops.shape == (40, 3, 16, 16) and label == 0
    outside = ((crops[:, 0] > 128) | (crops[:, 2] > 128)).flatten(1).any(1)
    assert outside.sum() >= 10  # many crops reach beyond the central square
    again, _ = ds[(0, 123, 40, (0.08, 1.0), (3 / 4, 4 / 3))]
    assert torch.equal(crops, again)  # the seed alone fixes the boxes
    fetch = Fetcher(ds, torch.device("cpu"), workers=0)
    x, y = next(fetch.stream([np.array([0, 7, 3])], Crops(2, (0.08, 1.0), (0.75, 4 / 3), 5)))
    assert x.shape == (3, 2, 3, 16, 16) and y.tolist() == [0, 1, 0]


def test_pretraining_on_a_folder_dataset_end_to_end(tiny, tmp_path):
    _three_bands(tmp_path, n=10, width=40, height=24)
    cfg = with_overrides(tiny, {
        "data": {"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "val_size": 4},
        "pretrain.epochs": 1, "pretrain.batch_size": 8, "runtime.loader_workers": 0})
    (tmp_path / "val").symlink_to(tmp_path / "train")  # a test split for the probes
    r = run_stage("pretrain", cfg, tmp_path / "pre")
    assert r["step"] == 2 and r["protocol"]["images"] == 16  # 20 images, 4 for validation
    assert 0 <= r["metrics"]["linear_val_top1"] <= 1


def test_the_official_1percent_list_selects_exactly_its_images(tmp_path):
    names = (PROJECT / "subsets/imagenet/1percent.txt").read_text().split()
    assert len(names) == 12811
    train = tmp_path / "train"
    for name in names:
        folder = train / name.split("_")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()  # listing needs no pixels
    for folder in train.iterdir():
        (folder / f"{folder.name}_extra.JPEG").touch()
    ds = FolderImages(train, 8, "imagefolder")
    assert len(ds) == 12811 + 1000
    idx = subset_from_file(ds, "subsets/imagenet/1percent.txt")  # found in the project
    assert len(idx) == 12811 and {ds.files[i] for i in idx} == set(names)
    _, val = validation_split(ds.labels.numpy(), 900, 0, excluded=idx)
    assert np.intersect1d(val, idx).size == 0 and len(val) == 900  # only extras
    (tmp_path / "bad.txt").write_text(f"{names[0]}\nn99999999_1.JPEG\n")
    with pytest.raises(DataError, match=r"finetune.subset_file=.*1 of its 2 names are not "
                                        r"images of the dataset, e.g. n99999999_1.JPEG"):
        subset_from_file(ds, tmp_path / "bad.txt", "finetune.subset_file")


# --- STL-10 ---------------------------------------------------------------------------


def test_stl10_pretrains_on_train_and_unlabelled(monkeypatch):
    def fake(split, root, download):
        n = {"train": 50, "unlabelled": 100, "test": 20}[split]
        labels = torch.arange(n) % 10 if split != "unlabelled" else torch.full((n,), -1)
        return ImageData(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), labels, 10, "stl10")

    monkeypatch.setattr(data_mod, "stl10", fake)
    data = load_config(PRESETS / "tiny.yaml", {"data": {"name": "stl10", "root": "x",
                                                         "val_size": 10}}).data
    splits = load_splits(data)
    assert isinstance(splits, Splits) and len(splits.rest) == 40
    pool, idx = unlabelled_pool(data, splits)
    assert len(pool) == 150 and len(idx) == 140  # 40 labelled outside validation + 100
    assert np.intersect1d(idx, splits.val).size == 0
    assert (pool.labels[idx[40:]] == -1).all()


def test_the_report_says_which_split_chose_what():
    from analysis.report import splits_note

    df = pd.DataFrame({"protocol": ['{"val_size": 6000}', '{"val_size": 6000}', None]})
    note = splits_note(df)
    assert "top-1 on the <b>test</b> split, which chose nothing" in note
    assert "6000 training images held out" in note


@pytest.mark.parametrize("stage", ["supervised", "finetune"])
def test_a_stage_with_an_lr_grid_takes_the_lr_with_the_best_validation_top1(
        stage, tiny, tmp_path):
    from scaling.stage_result import load_final_models

    cfg = with_overrides(tiny, {"finetune.label_fraction": 1.0, f"{stage}.epochs": 8,
                                f"{stage}.batch_size": 32, f"{stage}.lr_grid": [1e-6, 2.0]})
    if stage == "finetune":
        run_stage("pretrain", with_overrides(tiny, {"pretrain.epochs": 1}), tmp_path / "pre")

    def train(c, out):
        pre = None if stage == "supervised" else tmp_path / "pre"
        return run_stage(stage, c, out, pre)

    r = train(cfg, tmp_path / stage)
    val = r["protocol"]["lr_grid_val_top1"]
    assert set(val) == {"1e-06", "2"} and val["2"] > val["1e-06"]  # 4 classes: 1e-6 learns nothing
    assert r["protocol"]["base_lr"] == 2.0 and r["metrics"]["val_top1"] == val["2"]
    # The grid's own directories, finished: read back, not trained again.
    single = with_overrides(cfg, {f"{stage}.lr_grid": []})
    runs = [train(single, tmp_path / stage / f"lr-{lr}") for lr in ("1e-06", "2")]
    for key in ("train_seconds", "wall_seconds"):  # the grid's whole cost
        assert r["metrics"][key] == pytest.approx(sum(x["metrics"][key] for x in runs))
    chosen = load_final_models(tmp_path / stage / "lr-2")["classifier"]
    final = load_final_models(tmp_path / stage)["classifier"]
    assert all(torch.equal(final[k], v) for k, v in chosen.items())
    assert train(cfg, tmp_path / stage) == r
    with pytest.raises(ConfigError, match=rf"{stage}.lr_grid=\(1e-06, 2.0\) .*val_size is 0"):
        with_overrides(cfg, {"data.val_size": 0})


def test_a_finetune_lr_grid_refuses_per_fraction_learning_rates(tiny):
    cfg = with_overrides(tiny, {"finetune.per_fraction": {0.1: {"base_lr": 0.01}}})
    with pytest.raises(ConfigError, match=r"lr_grid=\(0.1, 0.2\).*finetune.per_fraction=\{\}"):
        with_overrides(cfg, {"finetune.lr_grid": [0.1, 0.2]})
    fine = with_overrides(cfg, {"finetune.lr_grid": [0.1, 0.2], "finetune.per_fraction": {}})
    assert fine.finetune.lr_grid == (0.1, 0.2)


def test_an_override_that_per_fraction_would_replace_is_refused(tmp_path):
    preset = PRESETS / "cifar10-gpu.yaml"
    with pytest.raises(ConfigError, match=r"finetune.epochs=5 .*per_fraction setting epochs for "
                                          r"fractions 0.01, 0.1, 1"):
        load_config(preset, {"finetune.epochs": 5})
    cleared = load_config(preset, {"finetune.epochs": 5, "finetune.per_fraction": {}})
    assert {c.finetune.epochs for c in fraction_configs(cleared)} == {5}
    moved = load_config(preset, {"finetune.per_fraction": {0.01: {"epochs": 5}}})
    assert [c.finetune.epochs for c in fraction_configs(moved)] == [5, 60, 60]
