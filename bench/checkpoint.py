"""Checkpoints in the training loop against checkpoints written off it, on a slow disk.

    .venv/bin/python bench/checkpoint.py [--depth 50] [--width 0.25] [--steps 24]
        [--every 4] [--write-delay 0.5]

One pretraining stage (synthetic 32 px images, batch 32, on this machine's CPU) runs
three times in this process, ``--steps`` timed steps each (then it stops):
- none: no checkpoint before the end;
- in the loop: a checkpoint every ``--every`` steps (runtime.checkpoint_every),
  serialised, hashed, written and fsynced before the next step;
- off the loop: a checkpoint at the same steps (runtime.checkpoint_minutes, at every
  log point), the loop only copying the state to the host, a thread writing it.
The storage is made slow on purpose: every file write sleeps ``--write-delay``
seconds first (an S3 mount or a busy NFS). Prints each run's seconds a step (the
mean over the steps, the end-of-stage checkpoint and evaluation excluded) and the
overhead of each checkpointing run over "none".
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from scaling.configure import PRESETS, load_config
from scaling.stages import checkpoint as checkpoint_module
from scaling.stages.registry import run as run_stage
from scaling.stages.stage_run import StageRun


class Done(Exception):
    """Raised after the timed steps: the rest of the stage is not the point."""


def seconds_a_step(overrides: dict[str, Any], steps: int, delay: float) -> float:
    """Mean wall seconds a step over ``steps`` steps after the first (which warms the
    allocator), the time each checkpoint took in the loop included."""
    cfg = load_config(PRESETS / "tiny.yaml", overrides)
    marks: list[float] = []
    original = StageRun.after_step
    write = checkpoint_module.atomic_write

    def after_step(self: StageRun, loss: torch.Tensor, lr: float, images: int) -> None:
        original(self, loss, lr, images)
        marks.append(time.perf_counter())  # after this step's checkpoint, if any
        if len(marks) > steps:
            if self._saver is not None:
                self._saver.wait()  # not timed: the stage's end
            raise Done

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return write(*args, **kwargs)

    with tempfile.TemporaryDirectory() as d, \
            mock.patch.object(StageRun, "after_step", after_step), \
            mock.patch.object(checkpoint_module, "atomic_write", slow_write), \
            contextlib.suppress(Done):
        run_stage("pretrain", cfg, Path(d) / "p")
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--write-delay", type=float, default=0.5)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    batch = 32
    base = {"runtime.device": "cpu", "model.depth": a.depth, "model.width": a.width,
            "data.image_size": 32, "data.val_size": 0, "pretrain.batch_size": batch,
            # One epoch of synthetic data is 256 / 32 = 8 steps. A stage logs at least
            # 20 points (so at most every total / 20 steps): enough epochs that it logs
            # every --every steps; the run stops after the timed steps.
            "pretrain.epochs": max(-(-(a.steps + 1) * batch // 256), 20 * a.every * batch // 256),
            "runtime.log_every": a.every, "evaluate.linear_steps": 1, "evaluate.knn_k": 1}
    runs = {
        "none": {"runtime.checkpoint_every": 10**6},
        "in the loop": {"runtime.checkpoint_every": a.every},
        "off the loop": {"runtime.checkpoint_minutes": 1e-9},  # at every log point
    }
    print(f"R{a.depth} {a.width:g}x, batch {batch} at 32 px on the CPU, a checkpoint every "
          f"{a.every} steps, every file write {a.write_delay:g} s late")
    seconds = {}
    for name, extra in runs.items():
        seconds[name] = seconds_a_step(base | extra, a.steps, a.write_delay)
        over = seconds[name] / seconds["none"] - 1
        print(f"  {name:13s} {seconds[name]:7.3f} s a step   overhead {over:+7.1%}")


if __name__ == "__main__":
    main()
