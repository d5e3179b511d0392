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
    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr={lr!r}; allowed: >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}; allowed: 0 <= momentum < 1")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
            nesterov=nesterov, lars=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd != 0.0:
                    g = g.add(p, alpha=wd)
                scaled_lr: torch.Tensor | float = lr
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ones = torch.ones_like(w_norm)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, ones
                    )
                    scaled_lr = lr * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"]
                v.mul_(m).add_(g * scaled_lr)
                update = v * m + g * scaled_lr if group["nesterov"] else v
                p.sub_(update)
        return loss
