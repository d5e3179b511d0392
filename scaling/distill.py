"""Stage 3: distil the fine-tuned teacher into a student on unlabelled images.

The teacher is fixed (eval mode, no gradient). Teacher and student see the same
crop+flip view (paper section 2). The student is a fresh ``Classifier`` of the
teacher's shape (self-distillation) or of ``distill.student``'s. The unlabelled
images are the pretraining set by default or ``distill.unlabelled``; images of
another size or channel count are cropped to the teacher's input shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaling.augment import CROP_FLIP, augment
from scaling.batches import Fetcher, epoch_batches, steps_per_epoch
from scaling.checkpoint import load_final_models, read_result
from scaling.config import ExperimentConfig, to_dict
from scaling.data import load_dataset
from scaling.env import Env
from scaling.evaluate import apply, top1
from scaling.finetune import labelled_indices
from scaling.losses import distillation_loss
from scaling.measure import forward_flops_per_image, size_metrics
from scaling.network import build_classifier
from scaling.optimizer import build_optimizer
from scaling.schedule import scaled_lr, warmup_cosine
from scaling.stage import StageRun, augment_generator, set_lr


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey images to RGB by repetition, RGB to grey by averaging."""
    if x.shape[1] == channels:
        return x
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)


def distill(
    cfg: ExperimentConfig, out: Path, teacher_dir: Path, env: Env | None = None
) -> dict[str, Any]:
    done = read_result(out)
    if done is not None:
        return done
    env = env or Env.local(cfg.runtime.device, cfg.runtime.compile)
    dc = cfg.distill

    # Data: unlabelled images; the labelled subset only when alpha mixes in labels.
    d = cfg.data
    train = load_dataset(d.name, "train", d.root, d.download, d.image_size)
    test = load_dataset(d.name, "test", d.root, d.download, d.image_size)
    u = dc.unlabelled or d
    unlabelled = load_dataset(u.name, "unlabelled", u.root, u.download, u.image_size)
    fetch = Fetcher(unlabelled, env.device, cfg.runtime.loader_workers)
    labelled_fetch = Fetcher(train, env.device, cfg.runtime.loader_workers)
    labelled = labelled_indices(cfg, train)
    spe = steps_per_epoch(len(unlabelled), dc.batch_size)
    shape = (train.image_size, train.image_size)

    # Teacher: the fine-tuned classifier, frozen.
    head_layer = cfg.finetune.head_layer
    teacher = build_classifier(cfg.model, cfg.head, head_layer, train.channels,
                               train.image_size, train.num_classes)
    teacher.load_state_dict(load_final_models(teacher_dir)["classifier"])
    teacher.to(env.device).eval().requires_grad_(False)
    if env.cuda:
        teacher.to(memory_format=torch.channels_last)

    torch.manual_seed(cfg.seed)
    student_cfg = dc.student or cfg.model
    net = build_classifier(student_cfg, cfg.head, head_layer, train.channels, train.image_size,
                           train.num_classes)
    flops = forward_flops_per_image(net, labelled_fetch(labelled[:1])[0].float())
    model = env.prepare(net)
    optimizer = build_optimizer(dc.optim, net, exclude=[net.classifier])
    peak_lr = scaled_lr(dc.optim.base_lr, dc.batch_size, dc.optim.lr_scaling)
    total = spe * dc.epochs
    warmup = round(dc.optim.warmup_fraction * total)

    gen = augment_generator(env, cfg.seed)
    run = StageRun("distill", out, env, cfg.runtime, spe, dc.epochs,
                   {"model": net, "optimizer": optimizer}, gen)
    per_worker = dc.batch_size // env.world
    while run.step < total:
        batches = epoch_batches(np.arange(len(unlabelled)), dc.batch_size, cfg.seed, run.epoch,
                                env.rank, env.world)
        for x, _ in fetch.stream(batches[run.skip_in_epoch():]):
            lr = warmup_cosine(run.step, peak_lr, total, warmup)
            set_lr(optimizer, lr)
            shard = (env.rank, env.world)
            view = match_channels(augment(x, CROP_FLIP, gen, shape, shard), train.channels)
            n = view.shape[0]
            labels = None
            if dc.alpha > 0:  # a global labelled batch drawn by (seed, step): resumable
                rng = np.random.Generator(np.random.PCG64([cfg.seed, run.step]))
                chosen = rng.choice(labelled, dc.batch_size)
                mine = chosen[env.rank * per_worker:(env.rank + 1) * per_worker]
                xl, labels = labelled_fetch(mine)
                view = torch.cat([view, augment(xl, CROP_FLIP, gen, shard=shard)])
            with env.autocast():
                with torch.no_grad():
                    teacher_logits = teacher(env.images(view[:n]))
                # One student forward for both batches: DDP expects one per step.
                logits = model(env.images(view)).float()
            labelled_logits = logits[n:] if labels is not None else None
            loss = distillation_loss(logits[:n], teacher_logits.float(), dc.temperature,
                                     labelled_logits, labels, dc.alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.after_step(loss, lr, x.shape[0] * env.world)

    metrics: dict[str, Any] = size_metrics(net, flops)
    if env.is_main:
        test_fetch = Fetcher(test, env.device)
        logits, y = apply(net, [net], test_fetch, len(test), env)
        t_logits, _ = apply(teacher, [teacher], test_fetch, len(test), env)
        metrics |= {"test_top1": top1(logits, y), "teacher_test_top1": top1(t_logits, y)}
    protocol = {
        "student": to_dict(student_cfg), "self_distillation": dc.student is None,
        "unlabelled": u.name, "temperature": dc.temperature, "alpha": dc.alpha,
        "batch_size": dc.batch_size, "epochs": dc.epochs, "head_layer": head_layer,
        "label_fraction": cfg.finetune.label_fraction,
        "labels_per_class": cfg.finetune.labels_per_class,
        "subset_seed": cfg.finetune.subset_seed, "augment": "crop+flip, same view for both",
        "probe": "student classifier, test split top-1", "teacher": str(teacher_dir),
    }
    return run.finish({"classifier": net.state_dict()}, metrics, protocol,
                      {"config": to_dict(cfg)})
