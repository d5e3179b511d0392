"""Global batch norm on any device: statistics over the batches of all workers.

SimCLR computes BN statistics over all replicas ("global BN"); per-replica BN
lets the contrastive loss cheat. torch's SyncBatchNorm runs on GPUs only, so
for CPU workers (gloo) this computes the same thing with an autograd-aware
all_reduce of per-channel sums. Converting swaps the class of each BN module
in place, so parameters, buffers and state-dict keys stay exactly the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaling.model.gather import world


def _global_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not bn.training or world()[1] == 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            bn.training, bn.momentum or 0.0, bn.eps)
    from torch.distributed.nn.functional import all_reduce

    dims = [0] + list(range(2, x.dim()))
    c = x.shape[1]
    shape = [1, c] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() / c], device=x.device, dtype=x.dtype)
    # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2:
    # the head's BN sees tiny variances where the one-pass form cancels badly.
    total = all_reduce(torch.cat([x.sum(dims), count]))  # sums; gradients flow back
    n = total[-1]
    mean = total[:c] / n
    centred = x - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims)) / n
    if bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            m = bn.momentum or 0.0
            bn.running_mean.lerp_(mean.detach(), m)
            bn.running_var.lerp_(var.detach() * n / (n - 1), m)  # unbiased, as PyTorch
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
    y = centred * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.weight is not None:
        y = y * bn.weight.view(shape)
    if bn.bias is not None:
        y = y + bn.bias.view(shape)
    return y


class GlobalBatchNorm1d(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_forward(self, x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_forward(self, x)


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Make every BatchNorm1d/2d in ``module`` global (in place); returns ``module``."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = GlobalBatchNorm2d
        elif isinstance(m, nn.BatchNorm1d):
            m.__class__ = GlobalBatchNorm1d
    return module
