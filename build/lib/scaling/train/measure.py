"""What every stage records: progress, throughput, FLOPs, peak memory, wall time."""

from __future__ import annotations

import itertools
import resource
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scaling.model.resnet import count_parameters
from scaling.records import CurvePoint
from scaling.train.env import eval_mode


def forward_flops_per_image(model: nn.Module, channels: int, image_size: int) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on one image, eval mode.

    Counted on ``meta`` stand-ins of the weights and of a CxSxS image: nothing is
    computed and the model's own tensors are never touched, so the count is the
    same wherever the model lives (the CPU, a GPU, or not moved yet). A training
    step costs about 3x this per image per forward it makes (forward + backward).
    """
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    weights = {k: torch.empty_like(v, device="meta") for k, v in named}
    example = torch.empty(1, channels, image_size, image_size, device="meta")
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        torch.func.functional_call(model, weights, (example,))
    return int(counter.get_total_flops())


def size_metrics(net: nn.Module, flops: int) -> dict[str, int]:
    """Encoder parameters (the paper's model size), with heads, and forward FLOPs."""
    return {"params": count_parameters(net.get_submodule("encoder")),
            "params_with_head": count_parameters(net),
            "forward_flops_per_image": flops}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or peak RSS of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Loss curve, LR and images/s at the points it is given; prints a line with ETA.

    Throughput counts only the time inside training steps (``step_seconds``), so
    evaluation and checkpointing do not dilute it; wall time counts everything.
    """

    def __init__(self, stage: str, total_steps: int, show: bool,
                 history: list[CurvePoint] | None = None, done_seconds: float = 0.0,
                 images: int = 0) -> None:
        self.stage, self.total, self.show = stage, total_steps, show
        self.history = history or []
        self.step_seconds = done_seconds  # carried over a resume
        self.images = images

    def step(self, step: int, epoch: int, loss: float | None, lr: float, images: int,
             seconds: float) -> None:
        """Count a step; with ``loss`` (the mean since the last point) add a curve point."""
        self.step_seconds += seconds
        self.images += images
        if loss is None:
            return
        rate = self.images / max(self.step_seconds, 1e-9)
        point: CurvePoint = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": lr,
                             "images_per_s": rate}
        self.history.append(point)
        if self.show:
            eta = self.eta_seconds(step + 1)
            print(f"[{self.stage}] epoch {epoch + 1} step {step + 1}/{self.total} "
                  f"loss {point['loss']:.4f} lr {lr:.4g} {rate:.0f} img/s "
                  f"ETA {_duration(eta)}", file=sys.stdout, flush=True)

    def eta_seconds(self, done: int) -> float:
        """Time left at the mean step time so far, ``done`` of ``total`` steps done."""
        return (self.total - done) * self.step_seconds / max(done, 1)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.step_seconds, 1e-9)

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "step_seconds": self.step_seconds, "images": self.images}
