"""How each dataset of the catalog (scaling/catalog.py) is loaded, keyed by its name.

The catalog holds the facts (sizes, roots, splits) and stays free of torch; this
module holds the code. An image folder (``folder=True`` in its entry) needs no
loader of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from scaling.catalog import CATALOG
from scaling.data import datasets as d
from scaling.data import unlabelled
from scaling.data.datasets import DataError, Dataset

# (split, root or None, download, image_size or None) -> the split's images and labels.
Loader = Callable[[str, "str | None", bool, "int | None"], Dataset]


def image_folder(name: str) -> Loader:
    """An image folder (root/train/CLASS/IMAGE, root/val/CLASS/IMAGE) named ``name``."""
    def load(split: str, root: str | None, download: bool, side: int | None) -> Dataset:
        return d.imagefolder(split, root, side, name)

    return load


def _cifar(classes: int) -> Loader:
    def load(split: str, root: str | None, download: bool, side: int | None) -> Dataset:
        return d.resized(d.cifar(split, root, download, classes), side)

    return load


LOADERS: dict[str, Loader] = {
    "fashion-mnist": lambda split, root, download, side: d.resized(
        d.fashion_mnist(split, root, download), side),
    "cifar10": _cifar(10),
    "cifar100": _cifar(100),
    "stl10": lambda split, root, download, side: d.resized(d.stl10(split, root, download), side),
    "synthetic": lambda split, root, download, side: d.synthetic(split, size=side or 16),
    "mnist-5k": lambda split, root, download, side: unlabelled.mnist_5k(root, side),
    "dead-leaves": lambda split, root, download, side: unlabelled.dead_leaves_set(side),
}


def loader(name: str) -> Loader:
    """The loader of catalog entry ``name``: its own, or the folder loader."""
    if name in LOADERS:
        return LOADERS[name]
    if CATALOG[name].folder:
        return image_folder(name)
    raise DataError(f"dataset={name!r} has no loader: add one to LOADERS in {__file__}, or "
                    "mark its catalog entry folder=True if it is an image folder")


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> Dataset:
    """Load ``split`` ("train", "test" or "unlabelled") of a dataset in the catalog."""
    if name not in CATALOG:
        raise DataError(f"dataset={name!r} is not registered; allowed: {', '.join(CATALOG)}")
    spec = CATALOG[name]
    if split not in spec.splits:
        if not spec.labelled:
            raise DataError(f"dataset={name!r} has no labels and no {split} split; allowed: "
                            "only as distill.unlabelled")
        raise DataError(f"split={split!r}; allowed: {', '.join(spec.splits)}")
    return loader(name)(split, None if root is None else str(root), download, image_size)
