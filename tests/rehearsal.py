"""Run a real stage function as it would run on a GPU, on a CPU-only machine.

The stage's own code runs (data on the device, model set-up, augmentation,
autocast forward, loss, optimiser step, queue, checkpoint save and resume) with
fake CUDA tensors (scaling.train.fake_cuda) at the preset's per-GPU batch, and
stops after a few steps. Replaced for the rehearsal, and only these:
- the dataset: the preset's image shape, fake pixels, real labels (splits need them);
- ``backward()``: fake_backward (autograd cannot start a CUDA thread without a driver);
- the augmentation generator: a CPU one (fake ops take it; a CUDA one needs a driver);
- a checkpoint's tensors are written as real zeros (fake tensors have no bytes);
- the networks are built outside the fake mode as real CPU modules, as a stage
  builds them (left uninitialised: nothing reads their values), then moved by the
  stage's own ``env.prepare``; checkpoints load outside it too (real CPU tensors,
  as ``map_location="cpu"`` gives on a GPU).
While the steps after the first run, a dispatch mode records every host sync
(``item``, ``_local_scalar_dense``, ``nonzero``, host-to-device copies) and every
op touching a CPU tensor: the steady-state step must have none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scaling.config import ExperimentConfig
from scaling.data.datasets import ImageData
from scaling.stages import checkpoint as checkpoint_module
from scaling.stages import distill as distill_module
from scaling.stages import finetune as finetune_module
from scaling.stages import pretrain as pretrain_module
from scaling.stages.registry import run as run_stage
from scaling.stages.stage_run import StageRun
from scaling.train import fake_cuda
from scaling.train.env import Env

SYNCS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
         "aten.nonzero_static.default"}


class Rehearsed(Exception):
    """Raised after the rehearsed steps: the stage got that far."""


@dataclasses.dataclass
class Record:
    steps: int = 0
    syncs: list[str] = dataclasses.field(default_factory=list)
    cpu_ops: list[str] = dataclasses.field(default_factory=list)
    conv_dtypes: set[torch.dtype] = dataclasses.field(default_factory=set)
    objects: dict[str, Any] = dataclasses.field(default_factory=dict)
    saved: list[Path] = dataclasses.field(default_factory=list)
    resumed_from: int | None = None


class StepGuard(TorchDispatchMode):
    """Records host syncs and CPU tensors while ``armed``."""

    def __init__(self, record: Record) -> None:
        super().__init__()
        self.record, self.armed = record, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.armed:
            name = str(func)
            tensors = [t for t in tree_flatten((args, kwargs, out))[0]
                       if isinstance(t, torch.Tensor)]
            if name in SYNCS:
                self.record.syncs.append(f"{name} at {_caller()}")
            devices = {t.device.type for t in tensors}
            if "cpu" in devices:
                if "cuda" in devices and name in ("aten._to_copy.default", "aten.copy_.default"):
                    self.record.syncs.append(f"{name} (host to device) at {_caller()}")
                else:
                    self.record.cpu_ops.append(f"{name} at {_caller()}")
        return out


def _caller() -> str:
    """The innermost frame of the project's code (where the op was asked for)."""
    for frame in reversed(traceback.extract_stack()):
        if "/scaling/" in frame.filename:
            return f"{frame.filename.split('/scaling/')[-1]}:{frame.lineno} {frame.line}"
    return "?"


def fake_data(mode: Any, n: int, channels: int, size: int, classes: int) -> ImageData:
    """Fake pixels (no memory) with real, balanced labels."""
    with mode:
        images = torch.empty(n, channels, size, size, dtype=torch.uint8)
    with unset_fake_temporarily():
        labels = torch.arange(n) % classes
    return ImageData(images, labels, classes, "rehearsal")


def _materialise(state: Any) -> Any:
    """A fake state dict as real zeros of the same shapes and dtypes (a checkpoint
    file of the right size and layout; the values are not the point)."""
    if isinstance(state, torch.Tensor):
        if fake_cuda.is_fake(state):
            with unset_fake_temporarily():
                return torch.zeros(state.shape, dtype=state.dtype)
        return state
    if isinstance(state, dict):
        return {k: _materialise(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_materialise(v) for v in state)
    return state


BUILDERS = {pretrain_module: ["build_contrastive"],
            finetune_module: ["pretrained_classifier", "build_classifier"],
            distill_module: ["build_classifier"]}


def _real(fn: Any) -> Any:
    def outside_the_fake_mode(*args: Any, **kwargs: Any) -> Any:
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    return outside_the_fake_mode


def _uninitialised(build: Any) -> Any:
    """The builder, returning a real module left uninitialised (fake_cuda.empty_module:
    R152 2x SK initialises in 14 s otherwise); its values are never read."""
    def build_empty(*args: Any, **kwargs: Any) -> Any:
        return fake_cuda.empty_module(lambda: build(*args, **kwargs))
    return build_empty


@contextlib.contextmanager
def rehearse(data: tuple[int, int, int, int], steps: int, record: Record,
             weights: dict[str, Any] | None = None, save: bool = True) -> Iterator[Env]:
    """Patch what a CPU-only machine lacks; yields the fake GPU's Env.
    ``data``: (images, channels, side, classes) of the fake dataset."""
    guard = StepGuard(record)
    original_after = StageRun.after_step
    original_init = StageRun.__init__
    original_save = checkpoint_module.save_checkpoint

    def init(self: StageRun, *a: Any, **k: Any) -> None:
        original_init(self, *a, **k)
        record.resumed_from = self.resumed_from
        record.objects = self.objects

    def after_step(self: StageRun, loss: torch.Tensor, lr: float, images: int) -> None:
        guard.armed = False
        original_after(self, loss, lr, images)
        record.steps += 1
        if record.steps == steps:
            if save:
                self.checkpoint()  # the real save path, tensors as real zeros
            raise Rehearsed
        guard.armed = record.steps >= 1  # the first step may set things up

    def save_zeros(stage_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any],
                   keep: int = 2) -> Path:
        path = original_save(stage_dir, step, _materialise(state), meta, keep)
        record.saved.append(path)
        return path

    def cpu_generator(env: Env, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1_000_003 + 17)

    def register_dtype(module: torch.nn.Module, args: Any, out: Any) -> None:
        if guard.armed and isinstance(module, torch.nn.Conv2d) and isinstance(out, torch.Tensor):
            record.conv_dtypes.add(out.dtype)

    with contextlib.ExitStack() as stack:
        mode = stack.enter_context(fake_cuda.fake_cuda())
        n, channels, size, classes = data
        dataset = fake_data(mode, n, channels, size, classes)
        stack.enter_context(mock.patch("scaling.data.splits.load_dataset",
                                       lambda *a, **k: dataset))
        for module in (pretrain_module, finetune_module, distill_module):
            stack.enter_context(mock.patch.object(module, "augment_generator", cpu_generator))
        if weights is not None:  # what the input stage's final/model.pt holds
            for module in (finetune_module, distill_module):
                stack.enter_context(mock.patch.object(module, "load_final_models",
                                                      lambda _: weights))
        for module, names in BUILDERS.items():
            for name in names:
                stack.enter_context(mock.patch.object(module, name,
                                                      _uninitialised(getattr(module, name))))
        stack.enter_context(mock.patch.object(StageRun, "after_step", after_step))
        stack.enter_context(mock.patch.object(StageRun, "__init__", init))
        stack.enter_context(mock.patch("scaling.stages.stage_run.save_checkpoint", save_zeros))
        # A checkpoint loads as real CPU tensors (map_location="cpu"), as on a GPU machine.
        stack.enter_context(mock.patch("scaling.stages.stage_run.latest_checkpoint",
                                       _real(checkpoint_module.latest_checkpoint)))
        stack.enter_context(mock.patch.object(torch.Tensor, "backward",
                                              lambda self, *a, **k: fake_cuda.fake_backward(self)))
        stack.enter_context(  # removed on exit
            torch.nn.modules.module.register_module_forward_hook(register_dtype))
        stack.enter_context(guard)
        yield Env(fake_cuda.CUDA, compile=False)


def run_rehearsal(stage: str, cfg: ExperimentConfig, out: Path, data: tuple[int, int, int, int],
                  steps: int = 3, checkpointing: bool = False,
                  weights: dict[str, Any] | None = None, *args: Any, save: bool = True
                  ) -> Record:
    """Stage ``stage`` (through scaling.stages.registry.run) until ``steps`` steps are
    done, then a checkpoint (``save``); ``weights``: the input stage's final models (fine-tuning's
    pretrained net, the teacher)."""
    record = Record()
    with rehearse(data, steps, record, weights, save) as env:
        env = dataclasses.replace(env, checkpointing=checkpointing)
        with contextlib.suppress(Rehearsed):
            run_stage(stage, cfg, out, *args, env=env)
    return record


def tensors_of(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor an object holds for a checkpoint (module or optimiser)."""
    if isinstance(obj, torch.nn.Module):
        yield from obj.named_parameters()
        yield from obj.named_buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for i, state in enumerate(obj.state.values()):
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    yield f"state[{i}].{k}", v


