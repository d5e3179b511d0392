"""Bookkeeping every training stage shares: resume, checkpoints, NaN guard, progress.

A stage function owns its data, model, loss and loop; it hands this object the
things that must survive a kill (state-dict holders and the augmentation RNG)
and calls ``after_step`` once per step. That is all the shared machinery there is.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed

from scaling.config import ExperimentConfig, OptimConfig, RuntimeConfig
from scaling.data.augment import ViewSpec
from scaling.data.batches import Fetcher, crops_for, epoch_batches
from scaling.data.splits import Splits, load_splits
from scaling.records import ProgressReport, StageResult
from scaling.stage_result import write_result
from scaling.stages.checkpoint import (
    BackgroundSaver,
    latest_checkpoint,
    save_checkpoint,
    to_host,
)
from scaling.train.env import Env
from scaling.train.measure import Progress, peak_memory_bytes
from scaling.train.schedule import LRSchedule


@dataclass(frozen=True)
class StageInputs:
    """What the registry's runner (scaling.stages.registry.run) hands a stage function:
    its configuration, its output directory, its input stage's directory, where it
    runs, and the data's splits, loaded once when first asked for."""

    cfg: ExperimentConfig
    out: Path
    input_dir: Path | None
    env: Env

    @functools.cached_property
    def splits(self) -> Splits:
        return load_splits(self.cfg.data)

    @property
    def input(self) -> Path:
        """The input stage's directory (the runner checks it is there)."""
        assert self.input_dir is not None
        return self.input_dir


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; nothing after the last good checkpoint was saved."""


POINTS = 20


class StageRun:
    def __init__(
        self, name: str, out: Path, env: Env, runtime: RuntimeConfig,
        steps_per_epoch: int, epochs: int, objects: dict[str, Stateful],
        generator: torch.Generator, variant: str | None = None,
    ) -> None:
        # variant: which run of a grid this is ("lr 0.02"), for the progress lines.
        self.name, self.out, self.env, self.runtime = name, out, env, runtime
        self.variant = variant
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.total_steps = steps_per_epoch * epochs
        # A short stage (100 fine-tuning steps) still draws a curve: at least about
        # POINTS loss points, never further apart than runtime.log_every.
        self.log_every = max(1, min(runtime.log_every, self.total_steps // POINTS))
        self.objects, self.generator = objects, generator
        self.started = time.perf_counter()
        if env.cuda:  # the stage's own peak, not the process's (a lane runs many stages)
            torch.cuda.reset_peak_memory_stats(env.device)
        self.step = 0
        self.resumed_from: int | None = None
        prior: dict[str, Any] = {}
        found = latest_checkpoint(out)
        if found is not None:
            state, meta = found
            for key, obj in objects.items():
                obj.load_state_dict(state[key])
            generator.set_state(state["rng"]["augment"])
            torch.set_rng_state(state["rng"]["torch"])
            self.step = self.resumed_from = meta["step"]
            prior = meta["progress"]
            if env.is_main and env.progress_lines:  # else the sweep's driver says it
                print(f"[{name}] resumed from step {self.step} ({out})", flush=True)
        self.progress = Progress(
            f"{name} {variant}" if variant else name, self.total_steps,
            env.is_main and env.progress_lines,
            prior.get("history"), prior.get("step_seconds", 0.0), prior.get("images", 0),
        )
        self._bad = torch.zeros((), dtype=torch.bool, device=env.device)
        self._loss_sum = torch.zeros((), device=env.device)
        self._loss_n = 0
        self._last = time.perf_counter()
        # Curve points reported so far: none, so a resumed stage's first report carries
        # its whole history (the points before the interrupt included).
        self._reported = 0
        # runtime.checkpoint_minutes: checkpoints by wall time, written by a thread; each
        # is reported at the next log point (every worker reports at the same steps).
        self._saver = BackgroundSaver() if runtime.checkpoint_minutes > 0 else None
        self._saved_at = time.perf_counter()
        self._unreported = False

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def skip_in_epoch(self) -> int:
        """Batches of the current epoch already done (non-zero only after a resume)."""
        return self.step - self.epoch * self.steps_per_epoch

    def batches(self, fetch: Fetcher, indices: np.ndarray, global_batch: int, seed: int,
                view: ViewSpec, views: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This worker's share of every remaining batch, epoch after epoch from where
        the run resumes; each epoch's order and (folder data) full-image crops are
        drawn from (seed, epoch), so a resumed run sees the batches it would have."""
        while self.step < self.total_steps:
            env = self.env
            batches = epoch_batches(indices, global_batch, seed, self.epoch, env.rank, env.world)
            crops = crops_for(view, views, seed, self.epoch)
            yield from fetch.stream(batches[self.skip_in_epoch():], crops)

    def due(self) -> tuple[bool, bool]:
        """(log, checkpoint): whether the step now finishing draws a curve point and
        whether it ends with a checkpoint. The host reads values only at such steps on
        a GPU (one read: ``_read``), and all workers agree on them."""
        step = self.step + 1
        last = step == self.total_steps
        if self._saver is not None:  # by wall time: decided at log points (see _read)
            return step % self.log_every == 0 or last, last
        every = self.runtime.checkpoint_every or self.steps_per_epoch
        return step % self.log_every == 0 or last, step % every == 0 or last

    def after_step(self, loss: torch.Tensor, lr: float, images: int) -> None:
        """Record a finished step; check for NaN; checkpoint when due."""
        self._bad |= ~torch.isfinite(loss.detach())
        self._loss_sum += loss.detach().float()
        self._loss_n += 1
        log_due, ckpt_due = self.due()
        mean = None
        # Check every step in a single CPU process (a read costs nothing there);
        # otherwise only at log points and checkpoints, and always before saving.
        if (not self.env.cuda and self.env.world == 1) or log_due or ckpt_due:
            mean, time_up = self._read(loss, log_due)
            ckpt_due = ckpt_due or time_up
        now = time.perf_counter()
        self.progress.step(self.step, self.epoch, mean, lr, images, now - self._last)
        self.step += 1
        if self._unreported and (log_due or ckpt_due):
            self._report_saved()
        if ckpt_due:
            self.checkpoint()
        self._last = time.perf_counter()

    def _read(self, loss: torch.Tensor, log_due: bool) -> tuple[float | None, bool]:
        """The step's one host read: whether any worker's loss went non-finite, (at a
        log point) the mean loss since the last point over all workers, and whether a
        checkpoint is due by wall time on any worker, in one all_reduce and one copy to
        the host. Raises NonFiniteLoss on every worker together (one raising alone
        would leave the others in the next collective)."""
        minutes = self.runtime.checkpoint_minutes
        time_up = log_due and minutes > 0 and time.perf_counter() - self._saved_at >= 60 * minutes
        both = torch.cat([self._bad.float().view(1),
                          (self._loss_sum / max(self._loss_n, 1)).view(1),
                          self._loss_sum.new_full((1,), float(time_up))])  # a fill: no copy
        if self.env.world > 1:
            torch.distributed.all_reduce(both)  # sums: any worker's flag makes it > 0
        bad, total, time_flag = both.cpu().tolist()  # one copy (on the device: three reads)
        if bad:
            kept = sorted((self.out / "checkpoints").glob("step-*"))
            where = str(kept[-1]) if kept else "none (no checkpoint yet)"
            raise NonFiniteLoss(
                f"{self.name}: loss became {float(loss.detach())} by step {self.step + 1}; "
                f"stopped without saving. Last good checkpoint: {where}. Lower the learning "
                "rate (optim.base_lr) or raise the temperature."
            )
        if not log_due:
            return None, False
        self._loss_sum.zero_()  # the mean loss since the last point: a smooth, honest curve
        self._loss_n = 0
        return total / self.env.world, time_flag > 0

    def checkpoint(self) -> Path | None:
        """Save the state now (rank 0) and report it; with runtime.checkpoint_minutes the
        write runs on a thread and the report waits for the next log point."""
        path = None
        if self.env.is_main:
            state: dict[str, Any] = {k: o.state_dict() for k, o in self.objects.items()}
            state["rng"] = {"augment": self.generator.get_state(),
                            "torch": torch.get_rng_state()}
            meta = {"stage": self.name, "epoch": self.epoch, "progress": self.progress.state()}
            if self._saver is None:
                path = save_checkpoint(self.out, self.step, state, meta,
                                       self.runtime.keep_checkpoints)
            else:  # the copy to the host is the loop's whole share of the cost
                snapshot, step, keep = to_host(state), self.step, self.runtime.keep_checkpoints
                self._saver.submit(lambda: save_checkpoint(self.out, step, snapshot, meta, keep))
        if self._saver is not None:
            self._saved_at = time.perf_counter()
            self._unreported = True
            return None
        self._report(path)
        return path

    def _report_saved(self) -> None:
        """Report the checkpoint the writer finished (rank 0 waits for it, if still
        writing); every worker calls this at the same step."""
        path = self._saver.wait() if self._saver is not None and self.env.is_main else None
        self._unreported = False
        self._report(path)

    def _report(self, path: Path | None) -> None:
        if self.env.report is not None:
            points = self.progress.history[self._reported:]  # since the last report
            self._reported = len(self.progress.history)
            progress: ProgressReport = {
                "stage": self.name, "step": self.step, "points": points,
                "resumed_from": self.resumed_from, "total_steps": self.total_steps,
                "epochs": self.epochs, "eta_s": self.progress.eta_seconds(self.step)}
            if self.variant:
                progress["variant"] = self.variant
            if self.progress.history:  # the latest point's loss, lr, epoch and rate
                last = self.progress.history[-1]
                progress |= {"epoch": last["epoch"], "loss": last["loss"], "lr": last["lr"],
                             "images_per_s": last["images_per_s"]}
            self.env.report(progress, path)

    def finish(self, models: dict[str, Any], metrics: dict[str, Any],
               protocol: dict[str, Any], extra: dict[str, Any]) -> StageResult:
        """Write the result (main worker only) with everything a stage records."""
        if self._unreported:  # the last checkpoint, written and reported before the result
            self._report_saved()
        result: dict[str, Any] = {
            "stage": self.name,
            "step": self.step,
            "metrics": {
                **metrics,
                "images_per_s": self.progress.images_per_second,
                "train_seconds": self.progress.step_seconds,
                "wall_seconds": time.perf_counter() - self.started,
                "peak_memory_bytes": peak_memory_bytes(self.env.device),
                "final_loss": next(
                    (p["loss"] for p in reversed(self.progress.history)
                     if math.isfinite(p["loss"])), None),
            },
            "history": self.progress.history,
            "protocol": protocol,
            "resumed_from": self.resumed_from,
            "world_size": self.env.world,
            "node": self.env.node,
            "device": str(self.env.device),
            **extra,
        }
        if self.env.is_main:
            return write_result(self.out, models, result)
        copy: StageResult = json.loads(json.dumps(result))  # as the main worker's reads
        return copy


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def augment_generator(env: Env, seed: int) -> torch.Generator:
    """Augmentation RNG on the training device, in the same state on every worker:
    each draws the choices of the whole global batch and applies its own rows."""
    return torch.Generator(env.device).manual_seed(seed * 1_000_003 + 17)


def labels_protocol(cfg: ExperimentConfig) -> dict[str, Any]:
    """Which labelled subset a classifier (or a student's teacher) was trained on."""
    ft = cfg.finetune
    return {"label_fraction": ft.label_fraction, "labels_per_class": ft.labels_per_class,
            "subset_seed": ft.subset_seed}


def optim_protocol(optim: OptimConfig, schedule: LRSchedule) -> dict[str, Any]:
    return {"optimizer": optim.name, "base_lr": optim.base_lr, "lr_scaling": optim.lr_scaling,
            "peak_lr": schedule.peak, "weight_decay": optim.weight_decay}
