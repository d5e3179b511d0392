"""A GPU's tensors without a GPU: shapes, dtypes, devices and bytes, no values.

Under ``FakeTensorMode`` a tensor on ``cuda:0`` allocates nothing and computes
nothing, but every op checks devices and dtypes as the GPU would. So code written
for a GPU runs its set-up and steps here: the dry run plans memory with the real
model and optimiser (scaling.train.footprint), and CI rehearses the GPU path of
every stage on a CPU-only machine (tests/test_gpu_rehearsal.py). Reading a value
(``float(t)``, ``.item()``, ``nonzero``) raises: on a GPU each is a host sync.

A CPU-only process lacks three things, replaced only inside ``fake_cuda()``:
autocast's CUDA check (else bf16 autocast silently turns itself off), the bf16
support query, and the peak-memory counters (there is no CUDA context to reset).
What cannot be faked: the autograd engine starts a thread per device and CUDA's
needs a driver, so ``backward()`` on fake CUDA tensors fails; ``fake_backward``
gives every parameter the gradient backward would (zeros, its shape, dtype and
device), which is what optimisers and memory plans need.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.cuda.amp.common as amp_common
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

CUDA = torch.device("cuda", 0)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Fake tensors, with CUDA autocast on; real inputs are converted when used."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        # torch's own copies (deepcopy, load_state_dict) ask fake tensors for a data
        # pointer and warn each time; there is none to give, and nothing is wrong.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        stack.enter_context(mock.patch.object(amp_common, "amp_definitely_not_available",
                                              lambda: False))
        stack.enter_context(mock.patch("torch.cuda.is_bf16_supported",
                                       lambda *a, **k: True))
        stack.enter_context(mock.patch("torch.cuda.reset_peak_memory_stats",
                                       lambda *a, **k: None))
        stack.enter_context(mode)
        yield mode


@contextlib.contextmanager
def fake_process_group(world: int) -> Iterator[None]:
    """This process as rank 0 of ``world`` workers whose collectives return at once,
    values unchanged (torch's fake process group, as torchtitan's memory estimator
    plans with): every collective a stage makes runs, on fake or real tensors."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():  # a real group here: plan or rehearse in another process
        raise RuntimeError("a fake process group needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor)


def fake_module(module: nn.Module, mode: FakeTensorMode, device: torch.device = CUDA,
                memory_format: torch.memory_format | None = None) -> nn.Module:
    """Replace a ``meta`` module's parameters and buffers by fake tensors on ``device``
    (in ``memory_format`` where 4-d), in place. Build big models on ``meta`` and
    convert them: initialising them fake runs data-dependent code (truncated normal)."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        fmt = memory_format if memory_format is not None and t.dim() == 4 else None
        with mode:
            return torch.empty_like(t, device=device, memory_format=fmt or torch.preserve_format)

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(convert(p), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = convert(b)
    return module


def empty_module(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` as a real CPU module with uninitialised weights, at no cost: built on
    ``meta`` (no init; weights loaded into it are dropped) then given empty storage.
    For planning and rehearsals, where nothing reads the values."""
    with unset_fake_temporarily(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="for .*: copying from a non-meta")
        with torch.device("meta"):
            net = build()
        return net.to_empty(device="cpu")


def leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The tensors ``loss.backward()`` would give a ``.grad``: the graph's leaves."""
    found: dict[int, torch.Tensor] = {}
    stack = [loss.grad_fn]
    seen: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)  # AccumulateGrad nodes hold the leaf
        if isinstance(variable, torch.Tensor):
            found[id(variable)] = variable
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return list(found.values())


def fake_backward(loss: torch.Tensor) -> None:
    """What ``loss.backward()`` leaves behind, without running it: a zero ``.grad``
    of each leaf's shape, dtype, device and layout, accumulated as autograd would."""
    for leaf in leaves(loss):
        with torch.no_grad():
            grad = torch.zeros_like(leaf, memory_format=torch.preserve_format)
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad
