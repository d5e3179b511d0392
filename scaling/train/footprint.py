"""How much memory one GPU needs for a stage's training step, planned on any machine.

Measured, not guessed: the stage's real network, optimiser and loss run one step
on fake tensors (scaling.train.fake_cuda) at the per-GPU batch, bf16 autocast on
CUDA as in training. The parts add up at the step's peak, the start of the backward:
- parameters, gradients and optimiser state: the real objects' tensors after a step;
- saved activations: every tensor autograd keeps for the backward, caught by
  ``saved_tensors_hooks`` and counted once per storage (weights excluded); with
  activation checkpointing, also the largest ResNet block's, which its backward
  recomputes and holds;
- the memory network's copy, the negative queue, a distillation teacher;
- data: an in-memory dataset copied to the device, the uint8 batch and its views.
- the backward's gradients in flight: twice the largest saved tensor;
- with several workers (``world``): the step runs as rank 0 of a fake process group
  of that size (collectives return at once, on fake tensors), so global BN's saved
  tensors and the loss's similarity matrices over the gathered negatives (N x 2WN a
  direction, ``similarity``) are measured; DDP's gradient buckets (``buckets``) hold
  the gradients (``gradient_as_bucket_view``: .grad is a view into them, so
  ``gradients`` is 0 there).
Not in the sum (``HEADROOM`` covers them): the CUDA context, cuDNN workspaces and
the allocator's fragmentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from scaling.config import ExperimentConfig, OptimConfig
from scaling.model.network import build_classifier, build_contrastive
from scaling.model.resnet import ResNet
from scaling.train import fake_cuda
from scaling.train.env import Env
from scaling.train.fake_cuda import empty_module
from scaling.train.losses import distillation_loss, nt_xent
from scaling.train.memory import NegativeQueue, momentum_copy
from scaling.train.optimizer import build_optimizer

GiB = 2**30
# Beyond the sum: ~0.5-1 GiB of CUDA context and cuDNN/cuBLAS workspaces per process,
# and ~10% for the caching allocator's fragmentation.
HEADROOM_BYTES = 1 * GiB
HEADROOM_FRACTION = 0.10


@dataclass(frozen=True)
class Footprint:
    """Bytes on one device at the peak of a training step."""

    parameters: int = 0
    gradients: int = 0
    buckets: int = 0  # DDP's gradient buckets (several workers): the gradients live there
    optimizer: int = 0
    activations: int = 0  # saved for the backward by the network
    # Saved by the loss: pretraining's similarity matrices over the negatives gathered
    # from every worker and the queue (N x (2WN + K) a direction); elsewhere the logits.
    similarity: int = 0
    recompute: int = 0  # activation checkpointing: the largest block, rebuilt in the backward
    backward: int = 0  # gradients in flight: twice the largest saved tensor
    momentum: int = 0  # the memory network (parameters and buffers)
    queue: int = 0
    teacher: int = 0
    data: int = 0  # an in-memory dataset on the device, the batch and its views

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def needed(self) -> int:
        """What the device must have free: the total with headroom."""
        return int(self.total * (1 + HEADROOM_FRACTION)) + HEADROOM_BYTES

    def parts(self) -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name) / GiB:.1f}" for f in fields(self)
                         if getattr(self, f.name))


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(module: nn.Module) -> int:
    return tensor_bytes(t for t in [*module.parameters(), *module.buffers()])


@contextlib.contextmanager
def saved_bytes(exclude: set[int], into: list[int]) -> Iterator[None]:
    """Adds to ``into[0]`` the bytes of every storage autograd saves, each once;
    ``into[1]``, where given, becomes the largest of them."""
    seen: set[int] = set(exclude)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen:
            seen.add(key)
            into[0] += storage.nbytes()
            if len(into) > 1:
                into[1] = max(into[1], storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


@contextlib.contextmanager
def as_rank_zero_of(world: int) -> Iterator[None]:
    """This process as rank 0 of ``world`` workers (fake_cuda.fake_process_group), and
    DDP's wrapper left out (it reads parameter storage, which fake tensors lack; its
    buckets are added by ``step_footprint``). World 1: nothing changes."""
    if world <= 1:
        yield
        return
    with fake_cuda.fake_process_group(world), \
            mock.patch("torch.nn.parallel.DistributedDataParallel", lambda m, **k: m):
        yield


def step_footprint(cfg: ExperimentConfig, stage: str, batch: int, channels: int, side: int,
                   classes: int, dataset_images: int = 0, device: str = "cuda",
                   checkpointing: bool | None = None, world: int = 1) -> Footprint:
    """One training step of ``stage`` at ``batch`` images per device, on one of ``world``
    data-parallel workers. ``dataset_images``: images of an in-memory dataset the
    stage copies to the device (0: a folder)."""
    with as_rank_zero_of(world):
        return _step_footprint(cfg, stage, batch, channels, side, classes, dataset_images,
                               device, checkpointing, world)


def _step_footprint(cfg: ExperimentConfig, stage: str, batch: int, channels: int, side: int,
                    classes: int, dataset_images: int, device: str, checkpointing: bool | None,
                    world: int) -> Footprint:
    ckpt = cfg.runtime.activation_checkpointing if checkpointing is None else checkpointing
    env = Env(fake_cuda.CUDA if device == "cuda" else torch.device("cpu"), checkpointing=ckpt,
              world=world)
    views = 2 if stage == "pretrain" else 1
    labelled = batch if stage == "distill" and cfg.distill.alpha > 0 else 0
    head_layer = 0 if stage in ("supervised", "distill") else cfg.finetune.head_layer
    with fake_cuda.fake_cuda():
        if stage == "pretrain":
            net: nn.Module = empty_module(
                lambda: build_contrastive(cfg.model, cfg.head, channels, side))
        else:
            model = cfg.student if stage == "distill" else cfg.model
            net = empty_module(
                lambda: build_classifier(model, cfg.head, head_layer, channels, side, classes))
        # Global BN on several workers, as each stage asks for it.
        model_on_device = env.prepare(net, sync_bn=stage != "pretrain" or cfg.pretrain.global_bn)
        parts: dict[str, int] = {"parameters": tensor_bytes(net.parameters())}
        weights = {p.untyped_storage()._cdata for p in net.parameters()}
        with torch.device(env.device):
            x = torch.empty(batch + labelled, channels, side, side, dtype=torch.uint8)
            # The augmented views are float32 (scaling.data.augment), kept through the step.
            v = torch.empty(views * (batch + labelled), channels, side, side)
        parts["data"] = tensor_bytes(iter([x, v])) + dataset_images * channels * side * side
        queue = None
        if stage == "pretrain" and cfg.pretrain.memory.queue_size:
            momentum = momentum_copy(net)
            queue = NegativeQueue(cfg.pretrain.memory.queue_size, cfg.head.out_dim).to(env.device)
            parts["momentum"] = _state_bytes(momentum)
            parts["queue"] = _state_bytes(queue)
        teacher_logits = None
        if stage == "distill":
            teacher = empty_module(lambda: build_classifier(
                cfg.model, cfg.head, cfg.finetune.head_layer, channels, side, classes))
            env.move(teacher).eval().requires_grad_(False)
            parts["teacher"] = _state_bytes(teacher)
            with torch.no_grad(), env.autocast():
                teacher_logits = teacher(env.images(v[:batch])).float()
        if ckpt:  # the largest block, recomputed in the backward, comes on top
            parts["recompute"] = max(_block_bytes(net, model_on_device, env, v, weights))
        activations, similarity = [0, 0], [0, 0]
        with env.autocast():
            with saved_bytes(weights, activations):
                out = model_on_device(env.images(v))
            with saved_bytes(weights, similarity):
                loss = _loss(stage, cfg, out, teacher_logits, queue, batch)
        parts["activations"] = activations[0]
        parts["similarity"] = similarity[0]
        # The backward holds the gradient flowing into an op and the one it makes.
        parts["backward"] = 2 * max(activations[1], similarity[1])
        fake_cuda.fake_backward(loss)
        grads = tensor_bytes(p.grad for p in net.parameters() if p.grad is not None)
        parts["buckets" if world > 1 else "gradients"] = grads
        optimizer = build_optimizer(_optim(cfg, stage), net)
        optimizer.step()
        parts["optimizer"] = tensor_bytes(
            t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return Footprint(**parts)


def _block_bytes(net: nn.Module, call: nn.Module, env: Env, x: torch.Tensor, weights: set[int]
                 ) -> list[int]:
    """Bytes each ResNet block saves for the backward in a plain (not checkpointed)
    forward: what recomputing that block holds while its backward runs."""
    resnets = [m for m in net.modules() if isinstance(m, ResNet)]
    blocks = [b for m in resnets for b in m.blocks()]
    counter, sizes = [0], []
    for m in resnets:
        m.checkpoint_blocks = False
    hooks = [b.register_forward_pre_hook(lambda *_: sizes.append(-counter[0])) for b in blocks]
    hooks += [b.register_forward_hook(lambda *_: sizes.append(sizes.pop() + counter[0]))
              for b in blocks]
    try:
        with saved_bytes(weights, counter), env.autocast():
            call(env.images(x))
    finally:
        for h in hooks:
            h.remove()
        for m in resnets:
            m.checkpoint_blocks = True
    return sizes


def _loss(stage: str, cfg: ExperimentConfig, out: torch.Tensor | list[torch.Tensor],
          teacher_logits: torch.Tensor | None, queue: NegativeQueue | None, batch: int
          ) -> torch.Tensor:
    if stage == "pretrain":
        assert isinstance(out, list)
        z1, z2 = out[-1].float().chunk(2)
        # A full queue: its negatives widen the similarity matrix the loss saves.
        negatives = None if queue is None else queue.queue
        # Gathered over the workers there are (the similarity matrix is N x 2WN).
        return nt_xent(z1, z2, cfg.pretrain.temperature, negatives=negatives)
    assert isinstance(out, torch.Tensor)
    logits = out.float()
    if stage == "distill":
        assert teacher_logits is not None
        return distillation_loss(logits[:batch], teacher_logits, 1.0)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long,
                                               device=logits.device))


def _optim(cfg: ExperimentConfig, stage: str) -> OptimConfig:
    if stage == "pretrain":
        return cfg.pretrain.optim
    if stage == "distill":
        return cfg.distill_optim()
    return cfg.finetune.optim if stage == "finetune" else cfg.supervised.optim
