"""Learning-rate rules as pure functions of the step (no scheduler objects)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from scaling.config import OptimConfig

Scaling = Literal["linear", "sqrt"]


def scaled_lr(base_lr: float, global_batch: int, scaling: Scaling) -> float:
    """SimCLR's LR rule: base * batch / 256 (linear) or base * sqrt(batch) (sqrt).

    Always pass the *global* batch (all workers): the multi-node trap in the
    reference's issue tracker is scaling by the per-worker batch.
    """
    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch!r}; allowed: >= 1")
    if scaling == "linear":
        return base_lr * global_batch / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch)
    raise ValueError(f"lr scaling={scaling!r}; allowed: 'linear', 'sqrt'")


def warmup_cosine(step: int, peak_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 to ``peak_lr``, then cosine decay to 0 at ``total_steps``.

    Matches the reference: lr = step / warmup * peak during warmup, then
    peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))).
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"total_steps={total_steps!r}, warmup_steps={warmup_steps!r}; "
            "allowed: total >= 1 and 0 <= warmup <= total"
        )
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps == warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """A stage's LR as a pure function of the step: ``optim.base_lr`` scaled by the
    global batch, linear warmup over ``optim.warmup_fraction`` of ``total`` steps,
    then cosine decay to 0."""

    peak: float
    total: int
    warmup: int

    @classmethod
    def of(cls, optim: OptimConfig, global_batch: int, total: int) -> LRSchedule:
        peak = scaled_lr(optim.base_lr, global_batch, optim.lr_scaling)
        return cls(peak, total, round(optim.warmup_fraction * total))

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.peak, self.total, self.warmup)
