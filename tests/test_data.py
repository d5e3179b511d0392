import numpy as np
import pytest
import torch

from scaling.catalog import FASHION_MNIST_SYSTEM_DIR
from scaling.data.datasets import DataError, subset_from_file
from scaling.data.loaders import load_dataset
from scaling.data.subsets import label_subset, load_indices, save_indices

needs_fmnist = pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; .ci/run does)",
)


@needs_fmnist
def test_fashion_mnist_from_the_debian_package():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert train.num_classes == 10 and train.channels == 1 and train.image_size == 28
    assert 60 < train.images.float().mean().item() < 90  # real images, not zeros


@needs_fmnist
def test_data_image_size_resizes_an_in_memory_set_once():
    """data.image_size is honoured for in-memory sets too (it once was silently ignored)."""
    native = load_dataset("fashion-mnist", "test")
    big = load_dataset("fashion-mnist", "test", image_size=42)
    assert big.images.shape == (10000, 1, 42, 42) and big.images.dtype == torch.uint8
    assert big.image_size == 42 and torch.equal(big.labels, native.labels)
    # Resampling keeps the mean brightness: within 1% of the 0-255 range.
    assert abs(big.images.float().mean() - native.images.float().mean()) < 2.55
    assert torch.equal(load_dataset("fashion-mnist", "test", image_size=28).images,
                       native.images)  # the native size: untouched


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("scaling.data.datasets.FASHION_MNIST_SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")
    # A root that was given must hold the data, even where the system has a copy.
    monkeypatch.undo()
    with pytest.raises(DataError, match=f"data.root='{tmp_path}' holds no Fashion-MNIST"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_missing_cifar_does_not_download(tmp_path):
    with pytest.raises(DataError, match="data.download: true"):
        load_dataset("cifar10", "train", root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="needs data.root"):
        load_dataset("stl10", "unlabelled")


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="dataset='mnist2'.*fashion-mnist"):
        load_dataset("mnist2", "train")
    with pytest.raises(DataError, match="split='val'"):
        load_dataset("synthetic", "val")


def test_imagefolder_and_filename_subsets(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            img = Image.new("RGB", (14, 10), (40 * i, 0, 0))
            img.save(tmp_path / "train" / c / f"{c}_{i}.png")
    ds = load_dataset("imagefolder", "train", root=tmp_path, image_size=8)
    img, label = ds[4]
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8 and label == 1
    (tmp_path / "subset.txt").write_text("dog_2.png\ncat_0.png\n")
    assert subset_from_file(ds, tmp_path / "subset.txt").tolist() == [0, 5]
    (tmp_path / "bad.txt").write_text("cow_1.png\n")
    with pytest.raises(DataError, match="1 of its 1 names are not images .*e.g. cow_1.png"):
        subset_from_file(ds, tmp_path / "bad.txt")
    with pytest.raises(DataError, match="val"):
        load_dataset("imagefolder", "test", root=tmp_path)


def test_synthetic_is_deterministic_and_split_differs():
    a, b = load_dataset("synthetic", "train"), load_dataset("synthetic", "train")
    t = load_dataset("synthetic", "test")
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, t.images)
    assert a.images.shape == (256, 1, 16, 16)


def test_label_subset_is_balanced_reproducible_and_nested():
    labels = np.repeat(np.arange(10), 600)
    s1 = label_subset(labels, fraction=0.01, seed=3)
    s10 = label_subset(labels, fraction=0.1, seed=3)
    assert np.array_equal(s1, label_subset(labels, fraction=0.01, seed=3))
    assert not np.array_equal(s1, label_subset(labels, fraction=0.01, seed=4))
    assert np.bincount(labels[s1]).tolist() == [6] * 10
    assert np.bincount(labels[s10]).tolist() == [60] * 10
    assert set(s1) <= set(s10)  # the 1% subset is inside the 10% one
    assert len(label_subset(labels, fraction=1.0)) == 6000
    per = label_subset(labels, per_class=13, seed=0)
    assert np.bincount(labels[per]).tolist() == [13] * 10


def test_label_subset_edge_cases():
    labels = np.array([0, 0, 0, 1, -1, -1])
    s = label_subset(labels, fraction=0.1)  # at least one per class; never unlabelled
    assert sorted(labels[s].tolist()) == [0, 1]
    assert label_subset(labels, per_class=5).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="fraction=1.5"):
        label_subset(labels, fraction=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        label_subset(labels)


def test_index_files_round_trip(tmp_path):
    idx = np.array([5, 1, 9])
    path = save_indices(tmp_path / "sub" / "labels.txt", idx)
    assert path.read_text() == "5\n1\n9\n"
    assert load_indices(path).tolist() == [5, 1, 9]
    ds = load_dataset("synthetic", "train")
    assert subset_from_file(ds, path).tolist() == [5, 1, 9]
    save_indices(tmp_path / "big.txt", np.array([999]))
    with pytest.raises(DataError, match="out of range"):
        subset_from_file(ds, tmp_path / "big.txt")


def test_a_new_dataset_is_one_catalog_entry(tmp_path, monkeypatch, tiny):
    """docs/data.md's worked example: an image folder of your own is one entry in
    scaling.catalog.CATALOG, and the config, the root check, the planner, the
    analysis and the stages all take it from there."""
    from PIL import Image

    from scaling.catalog import CATALOG, DatasetSpec, root_problem
    from scaling.config import ConfigError
    from scaling.configure import with_overrides
    from scaling.runtime.local import pipeline_jobs, run_local
    from scaling.study.plan import stage_flops

    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("val", 6)):
        for shape in ("square", "disc"):
            (tmp_path / "shapes" / split / shape).mkdir(parents=True)
            for i in range(n):
                yy, xx = np.mgrid[:16, :16] - rng.integers(6, 10, size=2)[:, None, None]
                mask = (np.abs(yy) < 4) & (np.abs(xx) < 4) if shape == "square" else (
                    yy ** 2 + xx ** 2 < 16)
                img = np.where(mask, rng.integers(150, 255), rng.integers(0, 80, (16, 16)))
                Image.fromarray(np.repeat(img[..., None], 3, 2).astype(np.uint8)).save(
                    tmp_path / "shapes" / split / shape / f"{i}.png")
    with pytest.raises(ConfigError, match="data.name='shapes'"):
        with_overrides(tiny, {"data.name": "shapes"})

    monkeypatch.setitem(CATALOG, "shapes", DatasetSpec(
        "shapes", "two shapes", 40, 3, 16, 2, 8, in_memory=False, needs_root=True,
        root_folders=("train", "val"), folder=True))
    assert "needs data.root" in root_problem("shapes", None, False)
    assert "no val/ folder" in root_problem("shapes", str(tmp_path / "shapes" / "val"), False)
    assert root_problem("shapes", str(tmp_path / "shapes"), False) is None
    cfg = with_overrides(tiny, {"data.name": "shapes", "data.root": str(tmp_path / "shapes"),
                                "data.image_size": 16, "label_fractions": [0.5]})
    assert cfg.data.resolved_val_size() == 8
    # The planner's estimate: 32 training images (40 less 8 for validation).
    per_image = stage_flops(cfg, "pretrain") / (2 * cfg.pretrain.epochs)
    assert stage_flops(with_overrides(cfg, {"data.val_size": 0}), "pretrain") == pytest.approx(
        per_image * 40 * 2 * cfg.pretrain.epochs / 32)
    jobs = pipeline_jobs(cfg, tmp_path / "runs")
    for job in jobs[:2]:  # pretraining, then fine-tuning on half the 32 labels
        result = run_local(job.stage, job.cfg, job.out, job.input)
        assert result["config"]["data"]["name"] == "shapes"
    assert result["stage"] == "finetune" and 0 <= result["metrics"]["test_top1"] <= 1


def test_every_catalog_entry_has_a_loader_and_the_catalog_imports_no_torch():
    """Issue 37: the catalog (the schema's) held loaders that imported the data layer
    lazily; now the facts sit at the bottom and the loaders in scaling/data."""
    import subprocess
    import sys

    from scaling.catalog import CATALOG
    from scaling.data.loaders import LOADERS, loader

    assert all(callable(loader(name)) for name in CATALOG)
    assert set(LOADERS) <= set(CATALOG)
    code = "import sys, scaling.config, scaling.catalog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
