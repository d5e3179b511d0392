"""Batches as index lists: deterministic per (seed, epoch), sharded over workers.

The order of an epoch is a pure function of (seed, epoch), so a stage resumed in
the middle of an epoch replays exactly the batches it had not yet seen, and every
worker agrees on the global order without communicating.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scaling.config import ConfigError, RuntimeConfig
from scaling.data import jpeg
from scaling.data.augment import ViewSpec
from scaling.data.datasets import Dataset, FolderImages, ImageData


def steps_per_epoch(n: int, global_batch: int, key: str = "batch_size") -> int:
    """Full batches only: contrastive and BN statistics want equal batch sizes.
    ``key`` names the setting in the error when not one batch fits."""
    steps = n // global_batch
    if steps == 0:
        raise ConfigError(key, global_batch, f"<= {n}, the training images there are (after "
                          "the validation split): fewer than one batch")
    return steps


def epoch_batches(
    indices: np.ndarray, global_batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[np.ndarray]:
    """This worker's share of every global batch of ``epoch``, in order.

    Global batch b holds ``order[b*B:(b+1)*B]``; worker r takes its r-th slice of
    B/world, so W workers see exactly the images of the single-worker batch.
    """
    if global_batch % world:
        raise ValueError(f"batch_size={global_batch} must be divisible by {world} workers")
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    order = indices[rng.permutation(len(indices))]
    per = global_batch // world
    steps = steps_per_epoch(len(indices), global_batch)
    return [order[b * global_batch + rank * per: b * global_batch + (rank + 1) * per]
            for b in range(steps)]


@dataclass(frozen=True)
class Crops:
    """Random-resized crops a folder dataset cuts from each full decoded image
    (in-memory datasets are cropped batched by scaling.data.augment instead)."""

    views: int  # crops per image (2 for pretraining)
    scale: tuple[float, float]  # area fraction range
    ratio: tuple[float, float]  # aspect range
    seed: int  # of the epoch: with the image index, it fixes that image's boxes


def item_seeds(seed: int, indices: np.ndarray) -> np.ndarray:
    """A 63-bit seed per (seed, index): splitmix64's finaliser, so neighbouring
    indices and epochs get unrelated generators."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + indices.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(item_seeds(seed, np.array([epoch]))[0])


def crops_for(spec: ViewSpec, views: int, seed: int, epoch: int) -> Crops:
    """The full-image crops of ``spec`` for one epoch (used by folder datasets only)."""
    return Crops(views, spec.crop_scale, spec.crop_ratio, epoch_seed(seed, epoch))


def default_loader_workers(cpus: int | None = None) -> int:
    """Decode processes: the cores this process may use (``cpus``: what Ray gave this
    worker; its affinity still shows the whole node), less one for the loop, <= 8
    (more than the cores only makes torch warn and the processes contend)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus is not None:
        cores = min(cores or cpus, cpus)
    return max(0, min(8, (cores or 1) - 1))


class EpochBatches:
    """A batch sampler whose batches are replaced every epoch: a DataLoader with
    persistent workers asks its sampler again at each ``iter()``."""

    def __init__(self) -> None:
        self.keys: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class Fetcher:
    """Turns index arrays into (uint8 images, labels) on the training device.

    In-memory datasets are copied to the device once, so a batch is one gather
    there; folder datasets decode through a DataLoader in worker processes.
    """

    def __init__(self, dataset: Dataset, device: torch.device, workers: int | None = None,
                 decode_on_device: bool = False, cpus: int | None = None) -> None:
        self.dataset = dataset
        self.device = device
        self.workers = default_loader_workers(cpus) if workers is None else workers
        self.decode_on_device = decode_on_device  # folder data: scaling.data.jpeg
        # Loaders whose workers live across epochs and calls (see _loader), by use.
        self._persistent: dict[tuple[str, bool], tuple[torch.utils.data.DataLoader[Any],
                                                        EpochBatches]] = {}
        if isinstance(dataset, ImageData):
            self.images = dataset.images.to(device)
            self.labels = dataset.labels.to(device)

    @classmethod
    def of(cls, dataset: Dataset, device: torch.device, runtime: RuntimeConfig,
           cpus: int | None = None) -> Fetcher:
        """``cpus``: the cores the runner gave this process (Env.cpus)."""
        return cls(dataset, device, runtime.loader_workers, runtime.decode == "device", cpus)

    def like(self, dataset: Dataset) -> Fetcher:
        """A fetcher of ``dataset`` with these settings."""
        return Fetcher(dataset, self.device, self.workers, self.decode_on_device)

    def __call__(self, idx: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch; ``idx`` may already be on the device (no upload then)."""
        if isinstance(self.dataset, ImageData):
            i = idx if isinstance(idx, torch.Tensor) else torch.from_numpy(idx).to(self.device)
            return self.images.index_select(0, i), self.labels.index_select(0, i)
        # Called every step (distillation's labelled batch): its own persistent loader,
        # not a new one with fresh worker processes each time.
        one = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
        return next(self.stream([one], use="call"))

    def stream(
        self, batches: list[np.ndarray], crops: Crops | None = None, use: str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (images, labels). A folder dataset with ``crops`` yields
        NxVxCxSxS random crops of the full images; otherwise NxCxHxW images
        (a folder dataset's evaluation view). ``use``: which persistent loader serves
        them (default: "train" with crops, a plain one for an evaluation)."""
        if isinstance(self.dataset, ImageData):
            yield from self._gather(batches)
            return
        use = use or ("train" if crops is not None else None)
        if self.decode_on_device:
            yield from self._decode_here(self.dataset, batches, crops, use)
            return
        c = crops
        keys = [b.tolist() if c is None else
                [(i, s, c.views, c.scale, c.ratio)
                 for i, s in zip(b.tolist(), item_seeds(c.seed, b).tolist(), strict=True)]
                for b in batches]
        loader = self._loader(self.dataset, keys, None, use)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _loader(self, dataset: torch.utils.data.Dataset[Any], keys: list[Any],
                collate: Any, use: str | None) -> torch.utils.data.DataLoader[Any]:
        """Training batches come from a DataLoader whose workers live across epochs
        (each epoch hands it new batches); starting 8+ decode processes a rank every
        epoch cost seconds each time. Each ``use`` has its own (one fetcher may stream
        training batches and serve single calls in between); an evaluation (once, at
        the end; ``use`` None) gets a plain one."""
        pin = self.device.type == "cuda" and collate is None
        if use is None or self.workers == 0:
            return torch.utils.data.DataLoader(
                dataset, batch_sampler=keys, num_workers=self.workers, collate_fn=collate,
                pin_memory=pin)
        key = (use, collate is None)
        if key not in self._persistent:
            sampler = EpochBatches()
            self._persistent[key] = (torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=self.workers,
                collate_fn=collate, persistent_workers=True, pin_memory=pin), sampler)
        loader, sampler = self._persistent[key]
        sampler.keys = keys
        return loader

    def _gather(self, batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In-memory batches as gathers on the device. The indices go up once for
        the whole list (an epoch): a copy from pageable memory waits for the host,
        and one per step would stall the GPU's queue every step."""
        if not batches:
            return
        flat = torch.from_numpy(np.concatenate(batches)).to(self.device)
        for i in flat.split([len(b) for b in batches]):
            yield self.images.index_select(0, i), self.labels.index_select(0, i)

    def _decode_here(self, ds: FolderImages, batches: list[np.ndarray], crops: Crops | None,
                     use: str | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Workers read the files; the batch is decoded and cropped on the device."""
        loader = self._loader(jpeg.EncodedFiles(ds), [b.tolist() for b in batches],
                              jpeg.collate, use)
        for b, (data, y, paths) in zip(batches, loader, strict=True):
            if self.device.type == "cuda":  # a copy from pageable memory waits for the host
                y = y.pin_memory()
            images = jpeg.decode(data, self.device, paths)
            if crops is None:  # the evaluation view
                x = jpeg.crop_resize(images, jpeg.centre_boxes(images), ds.image_size)[:, 0]
            else:
                seeds = item_seeds(crops.seed, b).tolist()
                boxes = jpeg.crop_boxes(images, seeds, crops.views, crops.scale, crops.ratio)
                x = jpeg.crop_resize(images, boxes, ds.image_size)
            yield x, y.to(self.device, non_blocking=True)


def eval_batches(indices: np.ndarray, batch: int) -> list[np.ndarray]:
    """Every index once, in order, last batch possibly short."""
    return [indices[s:s + batch] for s in range(0, len(indices), batch)]
