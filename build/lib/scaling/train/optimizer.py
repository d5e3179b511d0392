"""Optimiser construction from an ``OptimConfig`` (LARS or SGD, same param groups)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from scaling.config import OptimConfig
from scaling.train.lars import LARS, param_groups


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, exclude: Iterable[nn.Module] = ()
) -> torch.optim.Optimizer:
    """BN parameters, biases and ``exclude`` get no weight decay (and no LARS
    adaptation) for both optimisers, so switching optimiser changes one thing.
    The learning rate is set every step from the schedule; 0 here is a placeholder.
    """
    groups = param_groups(model, cfg.weight_decay, exclude)
    if cfg.name == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum)
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
