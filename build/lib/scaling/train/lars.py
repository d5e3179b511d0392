"""LARS (You et al. 2017) as the SimCLR reference implements it (lars_optimizer.py).

Per parameter: g <- g + wd * w; trust = eta * ||w|| / ||g|| (1 when either norm
is 0); v <- m * v + lr * trust * g; w <- w - v. Note the momentum buffer holds
lr-scaled updates, as in the TF reference. Parameters of normalisation layers and
biases (all 1-D tensors), and any module passed as ``exclude``, get neither weight
decay nor adaptation: chosen by module type and tensor shape, never by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(
    model: nn.Module, weight_decay: float, exclude: Iterable[nn.Module] = ()
) -> list[dict[str, Any]]:
    """Split parameters into an adapted+decayed group and an excluded group.

    Excluded: every parameter of a normalisation module, every 1-D parameter
    (biases), and every parameter of the modules in ``exclude`` (the reference
    excludes the supervised head).
    """
    excluded_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            excluded_ids.update(id(p) for p in m.parameters(recurse=False))
    for m in exclude:
        excluded_ids.update(id(p) for p in m.parameters())
    adapted: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (plain if id(p) in excluded_ids or p.ndim <= 1 else adapted).append(p)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars": True},
        {"params": plain, "weight_decay": 0.0, "lars": False},
    ]


class LARS(Optimizer):
    """``foreach=True`` updates each parameter group with multi-tensor
    (``torch._foreach_*``) ops, a dozen kernel launches per group instead of a
    dozen per tensor; ``False`` is the per-parameter reference loop. The two agree
    to float32 rounding (tests/test_optim.py). ``None`` (the default) is the
    multi-tensor path (bench/lars.py measures both)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr={lr!r}; allowed: >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}; allowed: 0 <= momentum < 1")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
            nesterov=nesterov, lars=True, foreach=foreach,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            # .get: checkpoints written before the option existed have no such key.
            update = _step_single if group.get("foreach") is False else _step_foreach
            update(params, bufs, group)
        return loss


def _step_single(params: list[torch.Tensor], bufs: list[torch.Tensor], group: dict[str, Any]
                 ) -> None:
    """The reference: one parameter at a time."""
    lr, m, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
    for p, v in zip(params, bufs, strict=True):
        g = p.grad
        assert g is not None
        if wd != 0.0:
            g = g.add(p, alpha=wd)
        scaled_lr: torch.Tensor | float = lr
        if group["lars"]:
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(g)
            trust = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm,
                                torch.ones_like(w_norm))
            scaled_lr = lr * trust
        v.mul_(m).add_(g * scaled_lr)
        update = v * m + g * scaled_lr if group["nesterov"] else v
        p.sub_(update)


def _step_foreach(params: list[torch.Tensor], bufs: list[torch.Tensor], group: dict[str, Any]
                  ) -> None:
    """The same arithmetic on the whole group at once; the trust ratios as one vector."""
    lr, m, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
    grads = [p.grad for p in params if p.grad is not None]
    if wd != 0.0:
        grads = list(torch._foreach_add(grads, params, alpha=wd))
    if group["lars"]:
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        trust = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm,
                            torch.ones_like(w_norm))
        steps = torch._foreach_mul(grads, list((lr * trust).unbind()))
    else:
        steps = torch._foreach_mul(grads, lr)
    torch._foreach_mul_(bufs, m)
    torch._foreach_add_(bufs, steps)
    if group["nesterov"]:
        torch._foreach_sub_(params, torch._foreach_add(torch._foreach_mul(bufs, m), steps))
    else:
        torch._foreach_sub_(params, bufs)
