"""Stage 2: fine-tuning from the projection head, and its supervised baseline.

Both train a ``Classifier`` with cross-entropy on the same class-balanced label
subset with crop+flip views; they differ only in where the weights start (a
pretrained encoder + first k head layers, or random) and in their schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scaling.config import ExperimentConfig, OptimConfig
from scaling.configure import to_dict
from scaling.data.augment import CROP_FLIP, augment_views
from scaling.data.batches import Fetcher, steps_per_epoch
from scaling.data.splits import labelled_subset, schedule_epochs
from scaling.data.subsets import save_indices
from scaling.model.network import Classifier, build_classifier, build_contrastive, classifier_from
from scaling.records import StageResult
from scaling.stage_result import load_final_models, read_local_result, write_result
from scaling.stages.evaluate import split_top1
from scaling.stages.stage_run import (
    StageInputs,
    StageRun,
    augment_generator,
    labels_protocol,
    optim_protocol,
    set_lr,
)
from scaling.train.measure import forward_flops_per_image, size_metrics
from scaling.train.optimizer import build_optimizer
from scaling.train.schedule import LRSchedule

Build = Callable[[int, int, int], Classifier]  # (channels, image size, classes) -> model


def finetune(job: StageInputs) -> StageResult:
    """Fine-tune the whole network from head layer ``cfg.finetune.head_layer`` of the
    pretrained network in ``job.input``."""
    cfg, pretrained = job.cfg, job.input

    def build(channels: int, size: int, classes: int) -> Classifier:
        return pretrained_classifier(cfg, pretrained, channels, size, classes)

    ft = cfg.finetune
    extra = {"head_layer": ft.head_layer, "pretrained": str(pretrained)}

    def run(where: Path, lr: float) -> StageResult:
        optim = dataclasses.replace(ft.optim, base_lr=lr)
        return train_classifier(job, "finetune", where, build, ft.epochs, ft.min_steps,
                                ft.batch_size, optim, extra, _variant(ft.lr_grid, lr))

    return best_on_validation(job, ft.lr_grid, ft.optim.base_lr, run)


def pretrained_classifier(
    cfg: ExperimentConfig, pretrained: Path, channels: int, size: int, classes: int
) -> Classifier:
    """The pretrained encoder and first ``finetune.head_layer`` head layers + a new classifier."""
    weights = load_final_models(pretrained)
    net = build_contrastive(cfg.model, cfg.head, channels, size)
    net.encoder.load_state_dict(weights["encoder"])
    net.head.load_state_dict(weights["head"])
    return classifier_from(net, cfg.finetune.head_layer, classes)


def supervised(job: StageInputs) -> StageResult:
    """The same architecture from scratch (encoder + linear) on the same labels,
    its LR chosen on validation from ``supervised.lr_grid``."""
    cfg = job.cfg

    def build(channels: int, size: int, classes: int) -> Classifier:
        return build_classifier(cfg.model, cfg.head, 0, channels, size, classes)

    s = cfg.supervised

    def run(where: Path, lr: float) -> StageResult:
        optim = dataclasses.replace(s.optim, base_lr=lr)
        return train_classifier(job, "supervised", where, build, s.epochs, s.min_steps,
                                s.batch_size, optim, {"head_layer": 0}, _variant(s.lr_grid, lr))

    return best_on_validation(job, s.lr_grid, s.optim.base_lr, run)


def _variant(grid: tuple[float, ...], lr: float) -> str | None:
    """How a progress line tells one LR-grid run from the others."""
    return f"lr {lr:g}" if grid else None


def best_on_validation(
    job: StageInputs, grid: tuple[float, ...], base_lr: float,
    run: Callable[[Path, float], StageResult],
) -> StageResult:
    """``run(out, base_lr)``, or with a ``grid`` one resumable run per base LR in
    ``out/lr-<value>`` and the one with the best validation top-1 as the result: its
    weights and metrics, every LR's validation top-1 in the protocol and the grid's
    summed ``train_seconds`` and ``wall_seconds``. Fine-tuning and its baseline are both
    tuned this way, so neither gets a better-chosen LR than the other."""
    out = job.out
    if not grid:
        return run(out, base_lr)
    runs = {lr: run(out / f"lr-{lr:g}", lr) for lr in grid}
    if not job.env.is_main:
        return runs[grid[0]]  # only the main worker has validation numbers and writes
    val: dict[float, float] = {}
    for lr, r in runs.items():
        v = r["metrics"].get("val_top1")
        assert v is not None, "an LR grid without validation is refused by the config"
        val[lr] = v
    best = max(grid, key=lambda lr: val[lr])  # ties: the first listed
    chosen: dict[str, Any] = {k: v for k, v in runs[best].items() if k != "model_sha256"}
    # The grid's cost: every run's training and wall time (a sweep's time accounting
    # subtracts one from the other).
    chosen["metrics"] = {**chosen["metrics"], **{k: sum(r["metrics"][k] for r in runs.values())
                                                 for k in ("train_seconds", "wall_seconds")}}
    chosen["protocol"] = {**chosen["protocol"], "lr_chosen_on": "validation top-1",
                          "lr_grid_val_top1": {f"{lr:g}": v for lr, v in val.items()}}
    return write_result(out, load_final_models(out / f"lr-{best:g}"), chosen)


def train_classifier(
    job: StageInputs, name: str, out: Path, build: Build, epochs: int, min_steps: int,
    batch_size: int, optim: OptimConfig, extra_protocol: dict[str, Any],
    variant: str | None = None,
) -> StageResult:
    """One classifier run into ``out`` (the stage's directory, or one LR's of a grid:
    a finished one there is returned as it is, so a grid resumes run by run)."""
    done = read_local_result(out)
    if done is not None:
        return done
    cfg, env = job.cfg, job.env

    # Data: the labelled subset of the training split outside validation; crop+flip.
    splits = job.splits
    train = splits.train
    labelled = labelled_subset(cfg, splits)
    if env.is_main:
        save_indices(out / "labels.txt", labelled)
    # Small subsets (1% of a small set) can hold fewer images than a batch:
    # shrink the batch to what exists, keeping it divisible by the workers.
    batch = min(batch_size, len(labelled) // env.world * env.world)
    fetch = Fetcher.of(train, env.device, cfg.runtime, env.cpus)
    spe = steps_per_epoch(len(labelled), batch)
    epochs = schedule_epochs(epochs, min_steps, spe)

    torch.manual_seed(cfg.seed)
    net = build(train.channels, train.image_size, train.num_classes)
    flops = forward_flops_per_image(net, train.channels, train.image_size)
    model = env.prepare(net, sync_bn=True)  # global BN, as in pretraining
    # The reference excludes the classifier from LARS adaptation and weight decay.
    optimizer = build_optimizer(optim, net, exclude=[net.classifier])
    schedule = LRSchedule.of(optim, batch, spe * epochs)

    gen = augment_generator(env, cfg.seed)
    run = StageRun(name, out, env, cfg.runtime, spe, epochs,
                   {"model": net, "optimizer": optimizer}, gen, variant)
    for x, y in run.batches(fetch, labelled, batch, cfg.seed, CROP_FLIP, 1):
        lr = set_lr(optimizer, schedule(run.step))
        (view,) = augment_views(x, CROP_FLIP, gen, 1, shard=(env.rank, env.world))
        with env.autocast():
            logits = model(env.images(view))
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.after_step(loss, lr, x.shape[0] * env.world)

    metrics: dict[str, Any] = {**size_metrics(net, flops), "labelled_examples": len(labelled)}
    if env.is_main:
        metrics |= split_top1({"": net}, splits, fetch, env)
    protocol = {
        "stem": cfg.model.resolved_stem(train.image_size), "image_size": train.image_size,
        **labels_protocol(cfg), "subset_file": cfg.finetune.subset_file, "batch_size": batch,
        "epochs": epochs, "steps": schedule.total, "min_steps": min_steps,
        **optim_protocol(optim, schedule), "global_bn": True,
        "val_size": len(splits.val), "val_seed": cfg.data.val_seed, "augment": "crop+flip",
        "probe": "the trained classifier; top-1 on val and test", **extra_protocol,
    }
    return run.finish({"classifier": net.state_dict()}, metrics, protocol,
                      {"config": to_dict(cfg), "labels_file": "labels.txt"})

