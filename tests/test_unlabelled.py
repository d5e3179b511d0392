"""Distillation's other unlabelled sets: the MNIST sample through the folder loader,
and dead-leaves synthetic images (scaling.data.unlabelled)."""

import numpy as np
import pytest
import torch
from PIL import Image

from scaling.config import ConfigError
from scaling.configure import PRESETS, load_config, with_overrides
from scaling.data.datasets import DataError, FolderImages
from scaling.data.loaders import load_dataset
from scaling.data.unlabelled import dead_leaves, disc_radii, export_mnist_5k
from scaling.stages.registry import run as run_stage


def test_dead_leaves_are_seeded_occluding_discs():
    a, b = dead_leaves(64, 28), dead_leaves(64, 28)
    assert a.shape == (64, 1, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, b)  # a seed fixes the set: nothing to store
    assert not torch.equal(a, dead_leaves(64, 28, seed=7))
    # Flat regions (discs) with edges: few grey levels per image, not noise.
    levels = [len(torch.unique(img)) for img in a]
    assert 2 <= np.median(levels) <= 49  # the background and at most 48 discs
    # Scale invariance puts discs of every size in: each image has flat areas
    # and edges between them.
    same = (a[..., 1:] == a[..., :-1]).float().mean()
    assert 0.5 < same < 0.99


def test_dead_leaves_radii_follow_the_inverse_cubic_density():
    n, rmin, rmax = 20000, 0.05, 0.45
    r = disc_radii(torch.rand(n, generator=torch.Generator().manual_seed(0)), rmin, rmax)
    assert float(r.min()) >= rmin and float(r.max()) <= rmax
    # p(r) = 2 r^-3 / (rmin^-2 - rmax^-2): E[r^2] = 2 ln(rmax / rmin) / (rmin^-2 - rmax^-2),
    # and the median solves F(r) = 1/2.
    z = rmin ** -2 - rmax ** -2
    assert float((r ** 2).mean()) == pytest.approx(2 * np.log(rmax / rmin) / z, rel=0.03)
    assert float(r.median()) == pytest.approx((rmin ** -2 - z / 2) ** -0.5, rel=0.02)


def test_other_sets_are_unlabelled_only():
    with pytest.raises(DataError, match="only as distill.unlabelled"):
        load_dataset("dead-leaves", "train")
    from scaling.config import ExperimentConfig
    from scaling.configure import from_dict

    with pytest.raises(ConfigError, match="data.name"):
        from_dict(ExperimentConfig, {"data": {"name": "mnist-5k"}})


def test_mnist_sample_is_exported_once_to_an_image_folder(tmp_path):
    root = export_mnist_5k(tmp_path / "mnist-5k")
    files = sorted((root / "train").glob("*/*.png"))
    assert len(files) == 5000
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
    img = np.asarray(Image.open(files[0]))
    assert img.shape == (28, 28) and img.max() > 200 and img.min() == 0
    before = files[0].stat().st_mtime_ns
    export_mnist_5k(root)  # kept as it is
    assert files[0].stat().st_mtime_ns == before
    ds = load_dataset("mnist-5k", "unlabelled", root)
    assert isinstance(ds, FolderImages) and len(ds) == 5000
    assert ds[0][0].shape == (3, 28, 28)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """One fine-tuned teacher (configs/tiny.yaml) for every unlabelled set."""
    cfg = load_config(PRESETS / "tiny.yaml", {"runtime.device": "cpu"})
    root = tmp_path_factory.mktemp("teacher")
    run_stage("pretrain", cfg, root / "pre")
    run_stage("finetune", cfg, root / "ft", root / "pre")
    return cfg, root / "ft"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist-5k", "dead-leaves"])
def test_distil_on_another_unlabelled_set_with_the_same_step_budget(
        teacher, tmp_path, monkeypatch, name):
    monkeypatch.setattr("scaling.data.unlabelled.DEAD_LEAVES_IMAGES", 2000)  # 54,000 in studies
    tiny, ft = teacher
    cfg = with_overrides(tiny, {
        "distill.unlabelled": {"name": name, "root": str(tmp_path / "m5k")},
        "distill.epochs": 1, "distill.min_steps": 30, "distill.batch_size": 256})
    r = run_stage("distill", cfg, tmp_path / "ds", ft)
    images = {"mnist-5k": 5000, "dead-leaves": 2000}[name]
    steps_per_epoch = images // 256
    # Epochs grow to whole epochs until the budget is met: 2 x 19 or 5 x 7 steps.
    assert r["step"] == -(-30 // steps_per_epoch) * steps_per_epoch
    assert r["protocol"]["unlabelled"] == name and r["protocol"]["images"] == images
    assert 0 <= r["metrics"]["val_top1"] <= 1
