"""Which images each stage sees. Nothing is chosen on the test split.

    training split = validation (data.val_size images, class-balanced, data.val_seed)
                   + the rest
    pretraining and distillation: the rest (STL-10: the rest + its 100k unlabelled)
    labelled subsets: drawn from the rest (random class-balanced, or a subset file)
    validation: every stage reports on it; presets and LRs are chosen on it
    test split: reported beside validation, never used to choose anything
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from scaling.catalog import CATALOG
from scaling.config import ConfigError, DataConfig, ExperimentConfig
from scaling.data.datasets import DataError, Dataset, ImageData, subset_from_file
from scaling.data.loaders import load_dataset
from scaling.data.subsets import label_subset


@dataclass(frozen=True)
class Splits:
    train: Dataset  # the whole training split; ``val`` and ``rest`` index into it
    val: np.ndarray  # sorted indices of the validation images
    rest: np.ndarray  # sorted indices of everything else: what training may use
    test: Dataset


def validation_split(
    labels: np.ndarray, size: int, seed: int, excluded: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, val): ``size`` images for validation, each class in proportion to its
    share of the candidates (largest remainder, so the total is exactly ``size``).
    ``excluded`` indices never go to validation. Its own random stream: the same
    seed as a label subset does not pick related images."""
    labels = np.asarray(labels)
    candidates = np.flatnonzero(labels >= 0)
    if excluded is not None:
        candidates = np.setdiff1d(candidates, excluded)
    if not 0 <= size < len(candidates):
        raise ConfigError("data.val_size", size, f"0..{len(candidates) - 1} (the training "
                          f"split has {len(candidates)} labelled images that may go to "
                          "validation, and training needs some)")
    classes, counts = np.unique(labels[candidates], return_counts=True)
    quota = size * counts / counts.sum()
    take = np.floor(quota).astype(int)
    by_remainder = np.argsort(-(quota - take), kind="stable")
    take[by_remainder[:size - take.sum()]] += 1
    rng = np.random.Generator(np.random.PCG64([seed, 0x5A1]))
    val = [rng.permutation(candidates[labels[candidates] == c])[:k]
           for c, k in zip(classes, take, strict=True)]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def load_splits(data: DataConfig) -> Splits:
    train = load_dataset(data.name, "train", data.root, data.download, data.image_size)
    test = load_dataset(data.name, "test", data.root, data.download, data.image_size)
    excluded = None
    if data.val_excluded_file is not None:
        excluded = subset_from_file(train, data.val_excluded_file, "data.val_excluded_file")
    rest, val = validation_split(train.labels.numpy(), data.resolved_val_size(), data.val_seed,
                                 excluded)
    return Splits(train, val, rest, test)


def unlabelled_pool(data: DataConfig, splits: Splits) -> tuple[Dataset, np.ndarray]:
    """Images for pretraining (and distillation on the same data): the training
    split without validation, and a set's own unlabelled images where the catalog says
    it has them (STL-10's 100,000)."""
    train = splits.train
    if not CATALOG[data.name].pretrain_extra:
        return train, splits.rest
    unl = load_dataset(data.name, "unlabelled", data.root, data.download)
    assert isinstance(train, ImageData) and isinstance(unl, ImageData)  # STL-10 is in memory
    pool = ImageData(torch.cat([train.images, unl.images]),
                     torch.cat([train.labels, torch.full((len(unl),), -1)]), train.num_classes,
                     data.name)
    return pool, np.concatenate([splits.rest, np.arange(len(train), len(pool))])


def distill_pool(cfg: ExperimentConfig, splits: Splits) -> tuple[Dataset, np.ndarray, str]:
    """Distillation's unlabelled images: the pretraining pool, or all of another
    dataset's (``distill.unlabelled``); and its name for the protocol."""
    u = cfg.distill.unlabelled
    if u is None or u == cfg.data:
        ds, idx = unlabelled_pool(cfg.data, splits)
        return ds, idx, cfg.data.name
    other = load_dataset(u.name, "unlabelled", u.root, u.download, u.image_size)
    return other, np.arange(len(other)), u.name


def labelled_subset(cfg: ExperimentConfig, splits: Splits) -> np.ndarray:
    """The labelled images every label-using stage of ``cfg`` shares, never from validation."""
    ft = cfg.finetune
    if ft.subset_file is not None:
        idx = subset_from_file(splits.train, ft.subset_file, "finetune.subset_file")
        clash = np.intersect1d(idx, splits.val)
        if len(clash):
            raise DataError(
                f"finetune.subset_file={ft.subset_file!r}: {len(clash)} of its images are in the "
                f"validation split (e.g. index {clash[0]}); set data.val_excluded_file to this "
                "list (or one containing it) so validation avoids them, or data.val_size: 0")
        return idx
    labels = splits.train.labels.numpy()[splits.rest]
    chosen = label_subset(labels, ft.label_fraction, ft.labels_per_class, ft.subset_seed)
    return splits.rest[chosen]


def schedule_epochs(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """Epochs, grown to whole epochs until the schedule has ``min_steps`` steps."""
    return max(epochs, math.ceil(min_steps / steps_per_epoch))
