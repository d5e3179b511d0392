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
While the steps after the first run, through their tail (``StageRun.after_step``),
a dispatch mode records every host sync (``item``, ``_local_scalar_dense``,
``nonzero``, copies between host and device) and every op touching a CPU tensor:
the steady-state step must have none, but for the one read a log point or a
checkpoint allows (``StageRun.due``), at that step only. The mode counts as an
"infra" mode, so Dynamo still compiles under it and a compiled step is watched too
(``compile=True``: Dynamo with its eager backend, counting graphs and breaks).
``world=2``: the stage runs as rank 0 of two workers on a fake process group
(collectives return at once), with global BN, the gathered negatives and the loss
all_reduce; DDP's wrapper is left out (it reads parameter storage, which fake
tensors lack; the 2-worker gloo tests run it).

The backward cannot run on fake CUDA tensors; ``rehearse_backward`` runs a stage's
real backward on the CPU instead, as rank 0 of two (fake) workers, DDP included,
with a mode that records every scalar read while ``backward()`` runs: the checkpoint
recomputation, the gather's backward and BN's backward.
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
    reads: list[str] = dataclasses.field(default_factory=list)  # the allowed ones
    due: list[int] = dataclasses.field(default_factory=list)  # steps allowed a read
    compiled_at: list[int] = dataclasses.field(default_factory=list)  # a graph per entry
    graph_breaks: int = 0
    cpu_ops: list[str] = dataclasses.field(default_factory=list)
    conv_dtypes: set[torch.dtype] = dataclasses.field(default_factory=set)
    objects: dict[str, Any] = dataclasses.field(default_factory=dict)
    saved: list[Path] = dataclasses.field(default_factory=list)
    resumed_from: int | None = None


class StepGuard(TorchDispatchMode):
    """Records host syncs and CPU tensors while ``armed``; ``reads`` syncs are
    allowed (and recorded apart) while ``reads_left`` > 0."""

    def __init__(self, record: Record) -> None:
        super().__init__()
        self.record, self.armed, self.reads_left, self.step = record, False, 0, 0

    @classmethod
    def is_infra_mode(cls) -> bool:
        # Dynamo runs eager under any other dispatch mode: a compiled step would go
        # unrehearsed. An infra mode only watches; it changes no op.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = str(func)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        to_host = name in ("aten._to_copy.default", "aten.copy_.default") and any(
            t.device.type == "cuda" for t in inputs) and (
            kwargs.get("device") == torch.device("cpu")
            or any(t.device.type == "cpu" for t in inputs))
        if name in SYNCS or to_host:
            if self.armed:
                where = f"step {self.step}: {name} at {_caller()}"
                if self.reads_left > 0:
                    self.reads_left -= 1
                    self.record.reads.append(where)
                else:
                    self.record.syncs.append(where)
            if inputs and fake_cuda.is_fake(inputs[0]):  # no value to read: make one up
                return _read_value(func, inputs[0], kwargs)
        if not self.armed:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        # The network's convolutions (the blur's, in data/augment.py, are fp32 by
        # design); seen here, they are seen compiled too.
        if name == "aten.convolution.default" and not _caller().startswith("data/"):
            self.record.conv_dtypes.add(out.dtype)
        tensors = inputs + [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if "cpu" in {t.device.type for t in tensors} and not to_host:
            self.record.cpu_ops.append(f"{name} at {_caller()}")
        return out


def _read_value(func: Any, t: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    """What an allowed read of a fake tensor gives: zeros (it has no values), as a
    real number or a real CPU tensor, so the code after the read runs on."""
    with unset_fake_temporarily():
        if str(func) == "aten._to_copy.default":
            return torch.zeros(t.shape, dtype=kwargs.get("dtype") or t.dtype)
        if str(func) == "aten.copy_.default":
            return t
        return torch.zeros((), dtype=t.dtype).item()


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


def counting_backend(record: Record, guard: StepGuard) -> Any:
    """Dynamo's eager backend (no AOT: it would trace a backward, which fake CUDA
    tensors cannot run), noting the step at which each graph is compiled."""
    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        record.compiled_at.append(guard.step)
        return gm.forward
    return backend


@contextlib.contextmanager
def rehearse(data: tuple[int, int, int, int], steps: int, record: Record,
             weights: dict[str, Any] | None = None, save: bool = True, compile: bool = False,
             world: int = 1) -> Iterator[Env]:
    """Patch what a CPU-only machine lacks; yields the fake GPU's Env.
    ``data``: (images, channels, side, classes) of the fake dataset."""
    import torch._dynamo

    guard = StepGuard(record)
    original_after = StageRun.after_step
    original_init = StageRun.__init__
    original_save = checkpoint_module.save_checkpoint

    def init(self: StageRun, *a: Any, **k: Any) -> None:
        original_init(self, *a, **k)
        record.resumed_from = self.resumed_from
        record.objects = self.objects

    def after_step(self: StageRun, loss: torch.Tensor, lr: float, images: int) -> None:
        # The tail is watched too: a log point or a checkpoint may read one value.
        if any(self.due()):
            guard.reads_left = 1
            record.due.append(guard.step)
        original_after(self, loss, lr, images)
        guard.reads_left = 0
        record.steps += 1
        if record.steps == steps:
            guard.armed = False
            if save:
                # The real save path, tensors as real zeros; outside the fake mode, so
                # the real CPU tensors (RNG states) it copies stay real.
                with unset_fake_temporarily():
                    self.checkpoint()
                if self._saver is not None:  # runtime.checkpoint_minutes: a thread writes it
                    self._saver.wait()
            raise Rehearsed
        guard.armed = record.steps >= 1  # the first step may set things up
        guard.step = record.steps

    def save_zeros(stage_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any],
                   keep: int = 2) -> Path:
        path = original_save(stage_dir, step, _materialise(state), meta, keep)
        record.saved.append(path)
        return path

    def cpu_generator(env: Env, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1_000_003 + 17)

    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        if world > 1:
            stack.enter_context(fake_cuda.fake_process_group(world))
            stack.enter_context(mock.patch("torch.nn.parallel.DistributedDataParallel",
                                           lambda module, **kwargs: module))
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
        stack.enter_context(guard)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        try:
            yield Env(fake_cuda.CUDA, compile=compile, world=world,
                      compile_backend=counting_backend(record, guard))
        finally:
            record.graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) \
                - breaks
            torch._dynamo.reset()


def run_rehearsal(stage: str, cfg: ExperimentConfig, out: Path, data: tuple[int, int, int, int],
                  steps: int = 3, checkpointing: bool = False,
                  weights: dict[str, Any] | None = None, *args: Any, save: bool = True,
                  compile: bool = False, world: int = 1) -> Record:
    """Stage ``stage`` (through scaling.stages.registry.run) until ``steps`` steps are
    done, then a checkpoint (``save``); ``weights``: the input stage's final models (fine-tuning's
    pretrained net, the teacher)."""
    record = Record()
    with rehearse(data, steps, record, weights, save, compile, world) as env:
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




class ReadGuard(TorchDispatchMode):
    """Records every scalar read (a host sync on a GPU) while ``armed``, and the
    ops that ran then (what the backward did)."""

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found, self.armed, self.ops = found, False, set[str]()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if self.armed:
            self.ops.add(str(func))
            if str(func) in SYNCS:
                self.found.append(f"{func} at {_caller()}")
        return func(*args, **(kwargs or {}))


def _ddp_without_transport(module: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Real DDP (its reducer, buckets and hooks run in the backward) whose bucket
    all_reduce is a completed future: the fake process group returns no tensors."""
    ddp = _DDP(module, **kwargs)

    def done(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations

        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    ddp.register_comm_hook(None, done)
    return ddp


_DDP = torch.nn.parallel.DistributedDataParallel


def rehearse_backward(stage: str, cfg: ExperimentConfig, out: Path, steps: int = 2,
                      weights: dict[str, Any] | None = None, *args: Any,
                      checkpointing: bool = True) -> tuple[list[str], set[str]]:
    """Run ``stage`` on the CPU for ``steps`` steps as rank 0 of two workers (global
    BN, gathered negatives, DDP), and return the scalar reads made inside
    ``backward()`` (on a GPU each is a host sync in the backward; the first step's
    count too: nothing there is set-up) and the ops the backward ran."""
    found: list[str] = []
    guard = ReadGuard(found)
    original_backward = torch.Tensor.backward
    done = [0]

    def backward(self: torch.Tensor, *a: Any, **k: Any) -> None:
        guard.armed = True
        try:
            original_backward(self, *a, **k)
        finally:
            guard.armed = False

    def after_step(self: StageRun, loss: torch.Tensor, lr: float, images: int) -> None:
        # Not the real tail (the fake group's gathered values are garbage, so the loss
        # may not be finite): the forward rehearsal watches the tail.
        self.step += 1
        done[0] += 1
        if done[0] == steps:
            raise Rehearsed

    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_cuda.fake_process_group(2))
        stack.enter_context(mock.patch("torch.nn.parallel.DistributedDataParallel",
                                       _ddp_without_transport))
        if weights is not None:
            for module in (finetune_module, distill_module):
                stack.enter_context(mock.patch.object(module, "load_final_models",
                                                      lambda _: weights))
        stack.enter_context(mock.patch.object(StageRun, "after_step", after_step))
        stack.enter_context(mock.patch.object(torch.Tensor, "backward", backward))
        stack.enter_context(guard)
        env = Env(torch.device("cpu"), world=2, checkpointing=checkpointing)
        with contextlib.suppress(Rehearsed):
            run_stage(stage, cfg, out, *args, env=env)
    assert done[0] == steps, f"{stage} stopped after {done[0]} of {steps} steps"
    return found, guard.ops
