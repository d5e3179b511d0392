"""Dataset loaders (the catalog, scaling/catalog.py, lists them): every dataset is
uint8 images NxCxHxW plus int64 labels.

Small datasets (Fashion-MNIST, CIFAR, STL-10, synthetic) live in memory as one
tensor, so a batch is one index operation and augmentation runs batched on the
training device. ``imagefolder`` (ImageNet layout) decodes lazily through a
DataLoader. Unlabelled images carry label -1.

Nothing here downloads unless ``download=True`` *and* a ``root`` is given; a
missing dataset raises ``DataError`` saying how to get it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scaling.catalog import FASHION_MNIST_SYSTEM_DIR
from scaling.data.augment import sample_crops
from scaling.data.subsets import load_indices


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says how to fix it."""

    def __init__(self, message: str) -> None:
        # Raised in a DataLoader worker, it comes back with the worker's traceback
        # in its message: keep our own last line, which names the file.
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


def resized(ds: ImageData, side: int | None) -> ImageData:
    """``ds`` with every image resized to ``side`` x ``side`` once (bilinear,
    antialiased, rounded back to uint8); None or the native size: ``ds`` itself."""
    if side is None or tuple(ds.images.shape[-2:]) == (side, side):
        return ds
    out = [F.interpolate(chunk.float(), size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
           for chunk in ds.images.split(4096)]
    return dataclasses.replace(ds, images=torch.cat(out))


@dataclass(frozen=True)
class ImageData:
    """An in-memory image set. images: NxCxHxW uint8, labels: N int64 (-1 = none)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]


# An evaluation view keeps the central 87.5% of the shorter side, then resizes
# (the reference's crop_proportion, data_util.center_crop).
CENTER_CROP_PROPORTION = 0.875

# A training request for a folder image: (index, seed, views, crop scale, crop ratio).
CropRequest = tuple[int, int, int, tuple[float, float], tuple[float, float]]


class FolderImages(torch.utils.data.Dataset):
    """ImageNet layout (root/split/class/*.jpg), decoded on access.

    ``ds[i]`` is the evaluation view: the central 87.5% square of the shorter side,
    resized to ``image_size``. ``ds[(i, seed, views, scale, ratio)]`` is ``views``
    random-resized crops (area ``scale``, aspect ``ratio``) of the *full* decoded
    image, resized to ``image_size``: one decode, any number of views, boxes drawn
    from ``seed`` alone (so a resumed or sharded run draws the same ones). Colour,
    flip and blur then run batched on the device (scaling.data.augment).
    """

    def __init__(self, root: Path, image_size: int, name: str) -> None:
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(root))
        except FileNotFoundError as e:  # no class folders, or no images in them
            raise DataError(f"data.root: {root} is not an image folder ({e}); allowed: "
                            f"{root}/CLASS/IMAGE (docs/data.md)") from None
        self.labels = torch.tensor(self.folder.targets, dtype=torch.int64)
        self.num_classes = len(self.folder.classes)
        self.image_size = image_size
        self.channels = 3
        self.name = name
        self.files = [Path(p).name for p, _ in self.folder.samples]

    def __len__(self) -> int:
        return len(self.folder)

    def decode(self, i: int) -> torch.Tensor:
        from torchvision.transforms.v2.functional import pil_to_tensor

        path, _ = self.folder.samples[i]
        try:
            return pil_to_tensor(self.folder.loader(path))  # PIL decode, RGB uint8 CxHxW
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
            raise DataError(f"{path} does not decode ({type(e).__name__}: {e}); replace or "
                            "remove it") from None

    def __getitem__(self, key: int | CropRequest) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.v2.functional import resized_crop

        size = [self.image_size, self.image_size]
        if isinstance(key, tuple):
            i, seed, views, scale, ratio = key
            img = self.decode(i)
            boxes = crop_boxes(img.shape[1], img.shape[2], seed, views, scale, ratio)
            crops = [resized_crop(img, y0, x0, h, w, size, antialias=True)
                     for y0, x0, h, w in boxes.long().tolist()]
            return torch.stack(crops), int(self.labels[i])  # VxCxSxS
        img = self.decode(key)
        top, left, side, _ = centre_box(img.shape[1], img.shape[2]).long().tolist()
        return resized_crop(img, top, left, side, side, size, antialias=True), int(self.labels[key])


def crop_boxes(height: int, width: int, seed: int, views: int, scale: tuple[float, float],
               ratio: tuple[float, float]) -> torch.Tensor:
    """An image's ``views`` training boxes (y0, x0, h, w) in whole pixels, drawn from
    its seed alone (a resumed or sharded run draws the same ones)."""
    g = torch.Generator().manual_seed(seed)
    boxes = sample_crops(views, height, width, scale, ratio, g, torch.device("cpu")).round()
    boxes[:, 2:] = boxes[:, 2:].clamp(min=1)
    return boxes


def centre_box(height: int, width: int) -> torch.Tensor:
    """The evaluation view's box (y0, x0, side, side): the central 87.5% square."""
    side = round(CENTER_CROP_PROPORTION * min(height, width))
    return torch.tensor([(height - side) // 2, (width - side) // 2, side, side],
                        dtype=torch.float32)


Dataset = ImageData | FolderImages


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): big-endian dims after a 4-byte magic."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (f"{stem}.gz", stem):
            if (d / name).exists():
                return d / name
    return None


def fashion_mnist(split: str, root: str | None, download: bool) -> ImageData:
    prefix = "t10k" if split == "test" else "train"
    # A root the user gave must hold the data: never train on a copy from elsewhere.
    dirs = [FASHION_MNIST_SYSTEM_DIR]
    if root is not None:
        dirs = [Path(root), Path(root) / "FashionMNIST" / "raw"]
    images_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    if images_path is None and download and root is not None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root, train=split != "test", download=True)
        images_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if (images_path is None or labels_path is None) and root is not None:
        raise DataError(
            f"data.root={root!r} holds no Fashion-MNIST {prefix} files (looked for "
            f"{prefix}-images-idx3-ubyte[.gz] in {', '.join(map(str, dirs))}); allowed: a "
            "directory with them, data.download: true to fetch them there, or no data.root "
            f"for the system copy ({FASHION_MNIST_SYSTEM_DIR})")
    if images_path is None or labels_path is None:
        raise DataError(
            f"Fashion-MNIST files not found in {', '.join(map(str, dirs))}. Install them with "
            "`apt-get install dataset-fashion-mnist`, or set data.root to a directory and "
            "data.download: true to fetch them through torchvision."
        )
    images = torch.from_numpy(_read_idx(images_path).copy()).unsqueeze(1)  # Nx1x28x28
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    return ImageData(images, labels, 10, "fashion-mnist")


def _torchvision(name: str, make: Callable[[], object], root: str | None) -> object:
    if root is None:
        raise DataError(f"{name} needs data.root (and data.download: true to fetch it)")
    try:
        return make()
    except RuntimeError as e:
        raise DataError(
            f"{name} not found under {root} ({e}). Set data.download: true to fetch it "
            "through torchvision, or point data.root at an existing copy."
        ) from None


def cifar(split: str, root: str | None, download: bool, classes: int) -> ImageData:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if classes == 10 else CIFAR100
    name = f"cifar{classes}"
    ds = _torchvision(name, lambda: cls(str(root), train=split != "test", download=download), root)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # type: ignore[attr-defined]
    labels = torch.tensor(ds.targets, dtype=torch.int64)  # type: ignore[attr-defined]
    return ImageData(images, labels, classes, name)


def stl10(split: str, root: str | None, download: bool) -> ImageData:
    from torchvision.datasets import STL10

    tv_split = {"train": "train", "test": "test", "unlabelled": "unlabeled"}[split]
    ds = _torchvision("stl10", lambda: STL10(str(root), split=tv_split, download=download), root)
    images = torch.from_numpy(ds.data)  # type: ignore[attr-defined]  # already NxCxHxW
    labels = torch.from_numpy(ds.labels.astype(np.int64))  # type: ignore[attr-defined]
    return ImageData(images, labels, 10, "stl10")


def imagefolder(split: str, root: str | None, image_size: int | None,
                name: str = "imagefolder") -> FolderImages:
    if root is None:
        raise DataError(f"{name} needs data.root: a directory with train/ and val/ inside")
    sub = {"train": "train", "unlabelled": "train", "test": "val"}[split]
    path = Path(root) / sub
    if not path.is_dir():
        raise DataError(f"data.root={root!r} has no {sub}/ folder; allowed: an image folder "
                        f"root/train/CLASS/IMAGE and root/val/CLASS/IMAGE (docs/data.md)")
    return FolderImages(path, image_size or 224, name)


def synthetic(
    split: str, num_classes: int = 4, size: int = 16, channels: int = 1, n: int = 256
) -> ImageData:
    """Learnable toy data for tests only: a smooth random prototype per class,
    shifted and noised per image. Deterministic; the test split has other seeds."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.rand(num_classes, channels, size // 4, size // 4, generator=g)
    protos = torch.nn.functional.interpolate(protos, size=(size, size), mode="bilinear")
    g.manual_seed({"train": 1, "unlabelled": 1, "test": 2}[split])
    labels = torch.arange(n) % num_classes
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    imgs = torch.stack([
        protos[int(c)].roll((int(dy), int(dx)), (1, 2))
        for c, (dy, dx) in zip(labels, shifts, strict=True)
    ])
    imgs = (imgs + 0.15 * torch.randn(imgs.shape, generator=g)).clamp(0, 1)
    return ImageData((imgs * 255).round().to(torch.uint8), labels, num_classes, "synthetic")


PROJECT = Path(__file__).resolve().parents[2]  # the repository: scaling/data/ is two below


def project_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as given if it exists, else relative to the project (shipped lists
    such as subsets/imagenet/1percent.txt work from any directory and on clusters)."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else PROJECT / p


def subset_from_file(
    dataset: Dataset, path: str | os.PathLike[str], key: str = "subset file"
) -> np.ndarray:
    """Indices named by a subset file: integers (our index files) or file names
    (the official ImageNet 1%/10% lists, one ``n01440764_10026.JPEG`` per line).
    ``key`` names the setting in errors (e.g. finetune.subset_file)."""
    file = project_path(path)
    if not file.is_file():
        raise DataError(f"{key}={str(path)!r}: no such file (relative paths are looked up "
                        f"in the working directory, then in {PROJECT})")
    lines = file.read_text().split()
    if all(t.isdigit() for t in lines):
        idx = load_indices(file)
        if len(idx) and idx.max() >= len(dataset):
            raise DataError(f"{key}={str(path)!r}: index {idx.max()} out of range; allowed: "
                            f"0..{len(dataset) - 1}")
        return idx
    if not isinstance(dataset, FolderImages):
        raise DataError(f"{key}={str(path)!r}: file-name subsets only apply to imagefolder "
                        "datasets; allowed here: a file of integer indices")
    where = {f: i for i, f in enumerate(dataset.files)}
    missing = [t for t in lines if t not in where]
    if missing:
        raise DataError(f"{key}={str(path)!r}: {len(missing)} of its {len(lines)} names are not "
                        f"images of the dataset, e.g. {missing[0]}; allowed: names of files "
                        "under the training folder")
    return np.sort(np.array([where[t] for t in lines], dtype=np.int64))
