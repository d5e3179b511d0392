"""Stage 3: distil the fine-tuned teacher into a student on unlabelled images.

The teacher is fixed (eval mode, no gradient). Teacher and student see the same
crop+flip view (paper section 2). The student is a fresh encoder + linear
classifier (no projection-head layers, as in the paper) of the teacher's
architecture (self-distillation) or of ``distill.student``'s. The unlabelled
images are the pretraining pool by default (never validation) or all of
``distill.unlabelled``; images of another size or channel count are cropped to
the teacher's input shape. Optimiser and temperature default to the paper's:
pretraining's LARS recipe, and tau 0.1 for self-distillation, 1.0 otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaling.config import ExperimentConfig
from scaling.configure import to_dict
from scaling.data.augment import CROP_FLIP, augment, augment_views
from scaling.data.batches import Fetcher, steps_per_epoch
from scaling.data.datasets import Dataset
from scaling.data.splits import distill_pool, labelled_subset, schedule_epochs
from scaling.model.network import Classifier, build_classifier
from scaling.records import StageResult
from scaling.stage_result import load_final_models
from scaling.stages.evaluate import split_top1
from scaling.stages.stage_run import (
    StageInputs,
    StageRun,
    augment_generator,
    labels_protocol,
    optim_protocol,
    set_lr,
)
from scaling.train.env import Env
from scaling.train.losses import distillation_loss
from scaling.train.measure import forward_flops_per_image, size_metrics
from scaling.train.optimizer import build_optimizer
from scaling.train.schedule import LRSchedule


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey images to RGB by repetition, RGB to grey by averaging."""
    if x.shape[1] == channels:
        return x
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)


def distill(job: StageInputs) -> StageResult:
    """Distil the fine-tuned teacher in ``job.input`` into the student."""
    cfg, out, teacher_dir, env = job.cfg, job.out, job.input, job.env
    dc = cfg.distill

    # Data: unlabelled images; the labelled subset only when alpha mixes in labels.
    splits = job.splits
    train = splits.train
    unlabelled, pool, unlabelled_name = distill_pool(cfg, splits)
    fetch = Fetcher.of(unlabelled, env.device, cfg.runtime, env.cpus)
    labelled_fetch = fetch if unlabelled is train else fetch.like(train)
    labelled = labelled_subset(cfg, splits)
    spe = steps_per_epoch(len(pool), dc.batch_size, "distill.batch_size")
    shape = (train.image_size, train.image_size)
    teacher = load_teacher(cfg, teacher_dir, train, env)

    # Student: encoder + linear classifier, no head layers (paper section 2.2).
    torch.manual_seed(cfg.seed)
    net = build_classifier(cfg.student, cfg.head, 0, train.channels, train.image_size,
                           train.num_classes)
    flops = forward_flops_per_image(net, train.channels, train.image_size)
    model = env.prepare(net, sync_bn=True)  # global BN, as in pretraining
    optim, temperature = cfg.distill_optim(), cfg.distill_temperature()
    # A student from scratch, as pretraining's network: every weight (its classifier
    # included) under LARS adaptation. Excluded like fine-tuning's, the classifier
    # took plain momentum steps at pretraining's peak LR on gradients scaled by
    # 1/tau, and diverged within one epoch on Fashion-MNIST (tau 0.1, LR 1.2).
    optimizer = build_optimizer(optim, net)
    epochs = schedule_epochs(dc.epochs, dc.min_steps, spe)
    schedule = LRSchedule.of(optim, dc.batch_size, spe * epochs)

    gen = augment_generator(env, cfg.seed)
    run = StageRun("distill", out, env, cfg.runtime, spe, epochs,
                   {"model": net, "optimizer": optimizer}, gen)
    shard = (env.rank, env.world)
    draws = LabelledDraws(cfg, labelled, env, spe)
    for x, _ in run.batches(fetch, pool, dc.batch_size, cfg.seed, CROP_FLIP, 1):
        lr = set_lr(optimizer, schedule(run.step))
        (view,) = augment_views(x, CROP_FLIP, gen, 1, shape, shard)
        view = match_channels(view, train.channels)
        n = view.shape[0]
        labels = None
        if dc.alpha > 0:
            xl, labels = labelled_fetch(draws(run.step))
            view = torch.cat([view, augment(xl, CROP_FLIP, gen, shard=shard)])
        with env.autocast():
            with torch.no_grad():
                teacher_logits = teacher(env.images(view[:n]))
            # One student forward for both batches: DDP expects one per step.
            logits = model(env.images(view)).float()
        labelled_logits = logits[n:] if labels is not None else None
        loss = distillation_loss(logits[:n], teacher_logits.float(), temperature,
                                 labelled_logits, labels, dc.alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.after_step(loss, lr, x.shape[0] * env.world)

    metrics: dict[str, Any] = size_metrics(net, flops)
    if env.is_main:
        metrics |= split_top1({"": net, "teacher_": teacher}, splits, labelled_fetch, env)
    protocol = {"unlabelled": unlabelled_name, "images": len(pool), "temperature": temperature,
                **optim_protocol(optim, schedule), "epochs": epochs, "val_size": len(splits.val),
                "teacher": str(teacher_dir), **_protocol(cfg)}
    return run.finish({"classifier": net.state_dict()}, metrics, protocol,
                      {"config": to_dict(cfg)})


def _protocol(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the configuration fixes about a distillation run (the rest is measured)."""
    return {
        "student": to_dict(cfg.student), "self_distillation": cfg.self_distillation,
        "student_head_layers": 0, "alpha": cfg.distill.alpha, "global_bn": True,
        "val_seed": cfg.data.val_seed, "batch_size": cfg.distill.batch_size,
        "teacher_head_layer": cfg.finetune.head_layer, **labels_protocol(cfg),
        "augment": "crop+flip, same view for both",
        "probe": "student classifier; top-1 on val and test",
    }


def load_teacher(cfg: ExperimentConfig, teacher_dir: Path, train: Dataset, env: Env
                 ) -> Classifier:
    """The fine-tuned classifier of ``teacher_dir``, frozen on the training device."""
    teacher = build_classifier(cfg.model, cfg.head, cfg.finetune.head_layer, train.channels,
                               train.image_size, train.num_classes)
    teacher.load_state_dict(load_final_models(teacher_dir)["classifier"])
    env.move(teacher)
    return teacher.eval().requires_grad_(False)


def labelled_batch(cfg: ExperimentConfig, labelled: np.ndarray, step: int, env: Env
                   ) -> np.ndarray:
    """This worker's share of a global labelled batch drawn by (seed, step): the same
    on every worker and after a resume."""
    rng = np.random.Generator(np.random.PCG64([cfg.seed, step]))
    chosen = rng.choice(labelled, cfg.distill.batch_size)
    per_worker = cfg.distill.batch_size // env.world
    return chosen[env.rank * per_worker:(env.rank + 1) * per_worker]


class LabelledDraws:
    """``labelled_batch`` for the coming steps, sent to the device a block of steps at
    a time: one upload per ``block`` steps instead of a host-waiting copy each step."""

    def __init__(self, cfg: ExperimentConfig, labelled: np.ndarray, env: Env, block: int
                 ) -> None:
        self.cfg, self.labelled, self.env, self.block = cfg, labelled, env, max(1, block)
        self.first: int | None = None  # the first step of the block on the device
        self.rows = torch.empty(0)

    def __call__(self, step: int) -> torch.Tensor | np.ndarray:
        if self.env.device.type == "cpu":  # nothing to wait for: no block needed
            return labelled_batch(self.cfg, self.labelled, step, self.env)
        if self.first is None or not self.first <= step < self.first + self.block:
            self.first = step
            block = [labelled_batch(self.cfg, self.labelled, s, self.env)
                     for s in range(step, step + self.block)]
            self.rows = torch.from_numpy(np.stack(block)).to(self.env.device)
        return self.rows[step - self.first]
