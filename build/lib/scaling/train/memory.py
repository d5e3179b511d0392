"""MoCo-style memory for extra negatives (SimCLRv2 section 2, "memory network").

The paper adds negatives from a momentum copy of encoder + head but does not
publish the details; ours are:
- the momentum network is an EMA of the online network's parameters (decay
  0.999 by default) whose BN buffers are copied from the online network;
- after every step it embeds both views of the batch (no gradient, train-mode
  BN) and the 2 * global-batch keys are pushed into a FIFO queue;
- the queue starts empty and only filled slots are used as negatives, so early
  steps do not contrast against random vectors;
- in-batch negatives and positives still come from the online network, so with
  an empty queue the loss is exactly NT-Xent.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from scaling.model.gather import gather_no_grad


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy to be updated by ``ema_update``."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online; buffers are copied."""
    t_params: list[torch.Tensor] = list(target.parameters())
    o_params: list[torch.Tensor] = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("target and online modules have different parameters")
    torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - decay)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        tb.copy_(ob)


class NegativeQueue(nn.Module):
    """A FIFO of the most recent ``size`` keys (KxD). Buffers, so it checkpoints."""

    queue: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size={size!r}; allowed: >= 1")
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        # ``filled`` mirrored on the host: reading the buffer every step would wait
        # for the GPU. Key counts are shapes (host-known); None: read once, lazily.
        self._filled: int | None = 0

    @torch.no_grad()
    def push(self, keys: torch.Tensor, gather: bool = True) -> None:
        """Append keys (NxD) from this worker (and all workers with ``gather``)."""
        keys = gather_no_grad(keys) if gather else keys
        size = self.queue.shape[0]
        keys = keys[-size:].to(self.queue.dtype)
        n = keys.shape[0]
        idx = (self.ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys
        self.ptr.copy_((self.ptr + n) % size)
        self.filled.copy_(torch.clamp(self.filled + n, max=size))
        self._filled = min(self.filled_count() + n, size)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A checkpoint's count is on the host already (map_location="cpu"): free to read.
        filled = state_dict.get(prefix + "filled")
        on_host = isinstance(filled, torch.Tensor) and filled.device.type == "cpu"
        self._filled = int(filled) if on_host and filled is not None else None

    def filled_count(self) -> int:
        if self._filled is None:  # loaded from device tensors: one read, not one per step
            self._filled = int(self.filled)
        return self._filled

    def negatives(self) -> torch.Tensor | None:
        """The filled part of the queue, or None when it is still empty."""
        k = self.filled_count()
        return None if k == 0 else self.queue[:k]

