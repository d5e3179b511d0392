"""The dataset catalog: one entry per dataset, and everything else reads it.

An entry says what a dataset is (its size, shape and classes, for the planner's
estimates and the analysis), where it lives (the default root, whether a root is
required, the folders a root must hold, whether torchvision can fetch it), which
splits it offers and how it is loaded. The configuration schema validates
``data.name`` against it, the planner estimates from it, the analysis names and
counts classes from it, the dry run checks roots with it.

Adding a dataset is one entry in ``CATALOG`` plus a test (docs/data.md has a worked
example). The catalog holds facts only, free of torch: the loaders live in the data
layer (scaling/data/loaders.py), keyed by the catalog's names; an image folder needs
none of its own (``folder=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LABELLED_SPLITS = ("train", "test", "unlabelled")  # "unlabelled": the training images


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # data.name
    title: str  # as the report writes it
    images: int  # in the training split (STL-10: with its unlabelled images)
    channels: int
    side: int  # native side (an image folder: the side its crops are resized to)
    classes: int  # 0: unlabelled only (distill.unlabelled), never a training set
    # Images held out of the training split for validation when data.val_size is
    # null: 10% of the small sets (the common CIFAR 45k/5k split), 10 a class of
    # ImageNet (a "minival" from train), 50 a class of STL-10's 5,000 labelled images.
    val_size: int
    splits: tuple[str, ...] = LABELLED_SPLITS
    in_memory: bool = True  # copied to the device whole (folder data is decoded per batch)
    default_root: Path | None = None  # where it is read from when data.root is null
    needs_root: bool = False  # data.root is required (nothing to read without it)
    root_folders: tuple[str, ...] = ()  # sub-folders a root must hold
    downloadable: bool = False  # data.download: true fetches it into data.root (torchvision)
    get_it: str = ""  # how to get it, for the error when it is missing
    # Its "unlabelled" split is images of its own that pretraining (and distillation
    # on the training data) pool with the training images: STL-10's 100,000. Otherwise
    # "unlabelled" is the training images themselves.
    pretrain_extra: bool = False
    # An image folder (root/train/CLASS/IMAGE, root/val/CLASS/IMAGE): the data layer's
    # folder loader reads it; any other dataset has its loader in scaling/data/loaders.py.
    folder: bool = False

    @property
    def labelled(self) -> bool:
        return self.classes > 0


FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

CATALOG: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    # Small, real, and installable offline from Debian's package: the default.
    DatasetSpec("fashion-mnist", "Fashion-MNIST", 60000, 1, 28, 10, 6000,
                default_root=FASHION_MNIST_SYSTEM_DIR, downloadable=True,
                get_it="the system copy (apt-get install dataset-fashion-mnist) or a folder "
                       "of the IDX files"),
    DatasetSpec("cifar10", "CIFAR-10", 50000, 3, 32, 10, 5000, needs_root=True,
                downloadable=True),
    DatasetSpec("cifar100", "CIFAR-100", 50000, 3, 32, 100, 5000, needs_root=True,
                downloadable=True),
    DatasetSpec("stl10", "STL-10", 105000, 3, 96, 10, 500, needs_root=True,
                downloadable=True, pretrain_extra=True),
    # ImageNet or any image folder (root/train/CLASS/IMAGE, root/val/CLASS/IMAGE); the
    # estimates assume ImageNet's size.
    DatasetSpec("imagefolder", "ImageNet (image folder)", 1281167, 3, 224, 1000, 10000,
                in_memory=False, needs_root=True, folder=True,
                root_folders=("train", "val"),
                get_it="root/train/CLASS/IMAGE and root/val/CLASS/IMAGE (docs/data.md)"),
    # Learnable toy data for tests, generated from a seed; 8 a class in validation.
    DatasetSpec("synthetic", "synthetic images", 256, 1, 16, 4, 32),
    # Unlabelled only, for distill.unlabelled (scaling.data.unlabelled).
    DatasetSpec("mnist-5k", "MNIST (5,000)", 5000, 1, 28, 0, 0, splits=("unlabelled",)),
    DatasetSpec("dead-leaves", "dead leaves", 54000, 1, 28, 0, 0, splits=("unlabelled",)),
)}


def spec(name: str) -> DatasetSpec:
    """The catalog entry of ``name``; KeyError names the ones there are."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"dataset {name!r} is not in the catalog ({', '.join(CATALOG)})") from None


def root_problem(name: str, root: str | None, download: bool) -> str | None:
    """Why loading ``name`` would fail for want of data at ``root`` (checked without
    loading anything: a dry run's check), or None. Only the folders are looked at."""
    s = spec(name)
    if s.default_root is None and not s.needs_root:
        return None  # generated, or written where it is asked for (mnist-5k)
    where = f"data.root={root!r}"
    if root is None:
        if s.needs_root:
            fetch = (" (and fetch it there: --set data.download=true, in YAML data.download: "
                     "true)") if s.downloadable else ""
            return f"{where}: {name} needs data.root, a folder on the training nodes{fetch}"
        if s.default_root is None or s.default_root.is_dir():
            return None
        return f"{where}: no folder {s.default_root} here; allowed: {s.get_it}"
    if download and s.downloadable:
        return None
    missing = [f for f in s.root_folders if not (Path(root) / f).is_dir()]
    if not Path(root).is_dir() or missing:
        what = (f"no {' and no '.join(f'{m}/' for m in missing)} folder here"
                if Path(root).is_dir() else "no such folder here")
        allowed = s.get_it or f"a folder holding {name} (--set data.root=PATH)" + (
            ", or fetch it into data.root: --set data.download=true (in YAML "
            "data.download: true)" if s.downloadable else "")
        return f"{where}: {what}; allowed: {allowed}"
    return None
