"""Cross-worker concatenation that keeps gradients, for contrastive negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (NxD) from all workers along dim 0 -> (W*N)xD.

    Gradients flow back to every worker's slice (the autograd-aware all_gather
    reduces them), so each worker's loss pushes on every embedding it used, as
    the reference's cross-replica concat does. Identity in a single process.
    All workers must pass the same N.
    """
    _, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    # The group named now: the default was bound when the function was first imported.
    return torch.cat(all_gather(x, group=dist.group.WORLD), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all workers, without gradients (memory-queue keys)."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
