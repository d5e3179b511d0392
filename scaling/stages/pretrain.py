"""Stage 1: SimCLRv2 contrastive pretraining of encoder + projection head."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaling.atomic import atomic_write_text
from scaling.config import ExperimentConfig
from scaling.configure import config_hash, to_dict
from scaling.data.augment import augment_views, view_spec
from scaling.data.batches import Fetcher, steps_per_epoch
from scaling.data.datasets import Dataset, ImageData
from scaling.data.splits import Splits, load_splits, unlabelled_pool
from scaling.data.subsets import label_subset
from scaling.model.network import build_contrastive
from scaling.records import StageResult
from scaling.stages.evaluate import apply, fit_linear_probe, knn_accuracy, top1
from scaling.stages.stage_run import StageInputs, StageRun, augment_generator, set_lr
from scaling.train.env import Env
from scaling.train.losses import nt_xent
from scaling.train.measure import forward_flops_per_image, size_metrics
from scaling.train.memory import NegativeQueue, ema_update, momentum_copy
from scaling.train.optimizer import build_optimizer
from scaling.train.schedule import LRSchedule

# Pixel probes only where they are cheap: in-memory sets of up to 32x32x3 values.
PIXEL_PROBE_MAX_DIMS = 3072
# The probes' training images at most (class-balanced): all of Fashion-MNIST's and
# CIFAR's; 100 a class of ImageNet's (an R152 3x encodes them in minutes, not hours).
PROBE_MAX_TRAIN = 100_000


def pretrain(job: StageInputs) -> StageResult:
    """Pretrain and write ``job.out``/result.json."""
    cfg, out, env = job.cfg, job.out, job.env
    p = cfg.pretrain

    # Data: the training split without validation (STL-10: + unlabelled), labels unused.
    splits = job.splits
    train = splits.train
    pool, indices = unlabelled_pool(cfg.data, splits)
    fetch = Fetcher.of(pool, env.device, cfg.runtime, env.cpus)
    spe = steps_per_epoch(len(indices), p.batch_size, "pretrain.batch_size")

    # Model: one forward over both views, so BN statistics cover both (global BN).
    torch.manual_seed(cfg.seed)
    net = build_contrastive(cfg.model, cfg.head, train.channels, train.image_size)
    flops = forward_flops_per_image(net, train.channels, train.image_size)
    model = env.prepare(net, sync_bn=p.global_bn)
    objects: dict[str, Any] = {"model": net}
    queue = momentum = None
    if p.memory.queue_size:
        momentum = momentum_copy(net)
        queue = NegativeQueue(p.memory.queue_size, cfg.head.out_dim).to(env.device)
        objects |= {"momentum": momentum, "queue": queue}

    optimizer = build_optimizer(p.optim, net)
    objects["optimizer"] = optimizer
    schedule = LRSchedule.of(p.optim, p.batch_size, spe * p.epochs)

    gen = augment_generator(env, cfg.seed)
    run = StageRun("pretrain", out, env, cfg.runtime, spe, p.epochs, objects, gen)
    view = view_spec(p.augment)
    for x, _ in run.batches(fetch, indices, p.batch_size, cfg.seed, view, 2):
        lr = set_lr(optimizer, schedule(run.step))
        views = torch.cat(augment_views(x, view, gen, 2, shard=(env.rank, env.world)))
        with env.autocast():
            z = model(env.images(views))[-1]
        z1, z2 = z.float().chunk(2)
        negatives = None if queue is None else queue.negatives()
        loss = nt_xent(z1, z2, p.temperature, negatives=negatives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if momentum is not None and queue is not None:
            ema_update(momentum, net, p.memory.momentum)
            with torch.no_grad(), env.autocast():
                queue.push(momentum(env.images(views))[-1].float())
        run.after_step(loss, lr, x.shape[0] * env.world)

    metrics: dict[str, Any] = size_metrics(net, flops)
    # Every worker encodes its share of the probe's images; rank 0 fits the probes.
    metrics |= probe(cfg, net.encoder, [net], splits, fetch if pool is train else None, env)
    small = isinstance(train, ImageData) and train.images[0].numel() <= PIXEL_PROBE_MAX_DIMS
    if env.is_main and small:
        pixels = pixel_reference(cfg, splits, out.parent, env)
        metrics |= {f"pixel_{k}": v for k, v in pixels.items()}
    models = {"encoder": net.encoder.state_dict(), "head": net.head.state_dict()}
    return run.finish(models, metrics, _protocol(cfg, train, len(indices), len(splits.val),
                                            len(probe_images(splits))),
                      {"config": to_dict(cfg)})


def _protocol(cfg: ExperimentConfig, train: Dataset, images: int, val_size: int,
              probe_n: int) -> dict[str, Any]:
    p = cfg.pretrain
    return {
        "stem": cfg.model.resolved_stem(train.image_size), "image_size": train.image_size,
        "head_layers": cfg.head.num_layers, "batch_size": p.batch_size, "epochs": p.epochs,
        "temperature": p.temperature, "queue_size": p.memory.queue_size,
        "images": images, "val_size": val_size, "val_seed": cfg.data.val_seed,
        "loss": "nt_xent as the reference: mean over view-1 anchors + mean over view-2 anchors",
        "probe_train_images": probe_n,
        "probe": f"frozen encoder, unaugmented features; fitted on the training split's labels "
                 f"without validation (class-balanced, at most {PROBE_MAX_TRAIN}); kNN "
                 f"k={cfg.evaluate.knn_k} T="
                 f"{cfg.evaluate.knn_temperature}; logistic L-BFGS; reported on val and test",
    }


def probe(
    cfg: ExperimentConfig, encoder: Callable[[torch.Tensor], torch.Tensor],
    modules: list[torch.nn.Module], splits: Splits, fetch: Fetcher | None, env: Env,
) -> dict[str, Any]:
    """kNN and linear-probe top-1 of a frozen ``encoder`` (``modules`` are put in eval
    mode): fitted on the labelled training images outside validation, reported on
    validation (``*_val_top1``) and test. Every worker of ``env`` calls it and encodes
    a share; rank 0 fits and returns the numbers (the others: {})."""
    train_fetch = fetch or Fetcher.of(splits.train, env.device, cfg.runtime, env.cpus)
    f_train, y_train = apply(encoder, modules, train_fetch, probe_images(splits), env, True)
    evals = {"": apply(encoder, modules, train_fetch.like(splits.test),
                       np.arange(len(splits.test)), env, True)}
    if len(splits.val):
        evals["val_"] = apply(encoder, modules, train_fetch, splits.val, env, True)
    if not env.is_main:
        return {}
    classes = splits.test.num_classes
    ev = cfg.evaluate
    linear = fit_linear_probe(f_train, y_train, classes, ev.linear_steps)
    out: dict[str, Any] = {"knn_val_top1": None, "linear_val_top1": None}
    for split, (f, y) in evals.items():
        out[f"knn_{split}top1"] = knn_accuracy(f_train, y_train, f, y, classes, ev.knn_k,
                                               ev.knn_temperature)
        out[f"linear_{split}top1"] = top1(linear(f), y)
    return out


def probe_images(splits: Splits) -> np.ndarray:
    """The probes' training images: the training split outside validation, a fixed
    class-balanced sample of PROBE_MAX_TRAIN where larger (ImageNet's 1.27M would keep
    rank 0 encoding for most of the collective timeout while the others wait)."""
    if len(splits.rest) <= PROBE_MAX_TRAIN:
        return splits.rest
    labels = splits.train.labels.numpy()[splits.rest]
    per_class = PROBE_MAX_TRAIN // max(splits.train.num_classes, 1)
    return splits.rest[label_subset(labels, per_class=per_class, seed=0)]


def pixel_probe(cfg: ExperimentConfig, env: Env | None = None, splits: Splits | None = None
                ) -> dict[str, Any]:
    """The same probes on raw pixels (the evaluation view, flattened): the reference
    line a pretrained representation has to beat to be worth anything."""
    # Rank 0 alone (a cached reference, no collective): a one-worker view of its Env.
    env = dataclasses.replace(env, rank=0, world=1) if env else Env.local(cfg.runtime)
    return probe(cfg, lambda x: x.flatten(1), [], splits or load_splits(cfg.data), None, env)


def pixel_reference(cfg: ExperimentConfig, splits: Splits, folder: Path, env: Env
                    ) -> dict[str, Any]:
    """``pixel_probe``, computed once per data and probe settings: cached as
    ``folder/pixels-<hash>.json`` beside the stage runs, which every pretraining
    run of a study would otherwise repeat."""
    key = config_hash({"data": to_dict(cfg.data), "evaluate": to_dict(cfg.evaluate)})
    cache = folder / f"pixels-{key}.json"
    try:
        return dict(json.loads(cache.read_text()))
    except (OSError, ValueError):  # absent, or unreadable: recompute
        pass
    result = pixel_probe(cfg, env, splits)  # the splits pretraining already loaded
    with contextlib.suppress(OSError):  # a read-only parent: the result is still returned
        atomic_write_text(cache, json.dumps(result))
    return result
