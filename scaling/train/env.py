"""Where a stage runs: device, numeric mode, and its place among workers.

A stage never asks Ray or torch.distributed directly; it receives an ``Env``.
The single-process default needs nothing; the Ray Train seam builds one with the
worker's rank and world size and a ``report`` hook for checkpoints.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaling.config import ConfigError, RuntimeConfig
from scaling.model.global_bn import convert_global_bn
from scaling.model.resnet import ResNet
from scaling.records import ProgressReport

Report = Callable[[ProgressReport, Path | None], None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device", name, "auto or cpu: no CUDA device is visible here")
    return torch.device(name)


@dataclass
class Env:
    device: torch.device = field(default_factory=lambda: pick_device("auto"))
    rank: int = 0
    world: int = 1
    compile: bool = False
    # torch.compile's backend. Inductor only compiles on CUDA (on the CPU it takes
    # minutes and gains little); any other backend is an explicit request that compiles
    # on every device: the CPU rehearsal of the GPU path uses aot_eager
    # (tests/test_compile.py), and aot_eager on a GPU isolates an Inductor bug.
    compile_backend: str | Callable[..., Any] = "inductor"
    checkpointing: bool = False  # runtime.activation_checkpointing: ResNet blocks recompute
    cpus: int | None = None  # the cores a runner gave this process (Ray: cpus_per_worker)
    # Called after every checkpoint and at the end with (metrics, directory or None).
    report: Report | None = None
    node: str = field(default_factory=socket.gethostname)  # Ray: the node id
    # Print progress lines here; off in a Tune trial, whose driver prints them once.
    progress_lines: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on CUDA; plain fp32 on CPU (bf16 CPU kernels are slower here)."""
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """Move to the device; channels_last on CUDA; DDP (+ global BN) with several
        workers; compiled where ``compiles``.

        Returns the module to call in the loop; keep a reference to the unwrapped
        ``model`` for checkpoints (no ``module.`` prefixes in saved state).
        """
        if self.world > 1 and sync_bn:
            # One global BN on every device (scaling/model/global_bn.py), not torch's
            # SyncBatchNorm on CUDA: the 2-worker CPU tests then run the very collectives
            # a GPU cluster runs, and it reads no count to the host per BN layer.
            convert_global_bn(model)
        self.move(model)
        if self.checkpointing:
            for m in model.modules():
                if isinstance(m, ResNet):
                    m.checkpoint_blocks = True
        wrapped: nn.Module = model
        if self.world > 1:
            ids = [self.device.index] if self.cuda else None
            # With global BN every worker's running statistics are the same (they come
            # from the gathered batch), so DDP's per-forward buffer broadcast is waste.
            # Gradients as views into DDP's buckets: no second fp32 copy of them.
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, broadcast_buffers=not sync_bn,
                gradient_as_bucket_view=True)
        if self.compiles:
            wrapped = torch.compile(wrapped, backend=self.compile_backend)  # type: ignore[assignment]
        return wrapped

    def move(self, model: nn.Module) -> nn.Module:
        """To the device, in channels_last on CUDA (cuDNN's fast NHWC kernels for bf16),
        in one conversion: each parameter is copied once."""
        if not self.cuda:
            return model.to(self.device)
        fast_cuda_math()
        # Module.to takes memory_format beside a device; its type stubs do not say so.
        return model.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]

    @property
    def compiles(self) -> bool:
        """torch.compile on one worker only. Decided again on the global BN (docs/gpu.md):
        the network under several workers now traces as one graph with no break
        (SyncBatchNorm broke it at every layer; tests/test_compile.py counts 0), but
        DDP + compile + NCCL has never run on a GPU here, so several workers stay eager
        until a lent GPU machine has run it. Inductor only on CUDA (``compile_backend``)."""
        return (self.compile and self.world == 1
                and (self.cuda or self.compile_backend != "inductor"))

    @classmethod
    def local(cls, rt: RuntimeConfig, report: Report | None = None,
              progress_lines: bool = True, node: str | None = None) -> Env:
        """A single-process environment (the one a stage uses when given none)."""
        return cls(pick_device(rt.device), compile=rt.compile, report=report,
                   checkpointing=rt.activation_checkpointing,
                   progress_lines=progress_lines, node=node or socket.gethostname())

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x


def fast_cuda_math() -> None:
    """TF32 for fp32 matmuls and convolutions (the fp32 parts outside bf16 autocast:
    the loss's similarity matrix, the probes) and cuDNN's autotuner (fixed shapes
    every step). Process-wide settings; on the CPU they change nothing."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def check_device(asked: str, gpus_per_worker: int, got: torch.device) -> None:
    """Refuse to train on the CPU while the run asked for (and holds) a GPU: a
    worker whose GPU is not visible (a driver or CUDA_VISIBLE_DEVICES problem)
    would otherwise run 100x slower and say nothing."""
    if got.type != "cuda" and (asked == "cuda" or gpus_per_worker > 0):
        key, value = ("runtime.device", asked) if asked == "cuda" else (
            "runtime.gpus_per_worker", gpus_per_worker)
        raise ConfigError(key, value, f"a visible CUDA device: this worker got {got} "
                          f"(torch.cuda.is_available() = {torch.cuda.is_available()}); check "
                          "the node's driver and CUDA_VISIBLE_DEVICES, or run with "
                          "runtime.device: cpu and runtime.gpus_per_worker: 0")


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Evaluate without changing the caller's train/eval state."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in zip(modules, was, strict=True):
            m.train(t)
