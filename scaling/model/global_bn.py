"""Global batch norm on every device: statistics over the batches of all workers.

SimCLR computes BN statistics over all replicas ("global BN"); per-replica BN
lets the contrastive loss cheat. This computes them with an autograd-aware
all_reduce of per-channel sums, on gloo (CPU workers) and NCCL (GPUs) alike: one
implementation, so the 2-worker CPU tests run the collectives a GPU cluster runs.
torch's SyncBatchNorm (GPU only) is not used: it would be a second program, and it
reads a count to the host once per BN layer per forward. Here nothing leaves the
device. Converting swaps the class of each BN module in place, so parameters,
buffers and state-dict keys stay exactly the same.
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
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce as reduce

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        # The group named now: the function's default was bound when it was first
        # imported, to whichever group existed then (a later one is not it).
        return reduce(t, group=dist.group.WORLD)

    dims = [0] + list(range(2, x.dim()))
    c = x.shape[1]
    shape = [1, c] + [1] * (x.dim() - 2)
    # Statistics in fp32 whatever autocast gives (bf16 sums of 10^6 values lose ~3
    # digits), as SyncBatchNorm's and cuDNN's kernels keep them; a no-op on fp32.
    xf = x.float()
    # Filled on the device: a tensor built from a Python number would be a copy from
    # the host, which waits for the GPU's queue at every BN layer.
    count = xf.new_full((1,), x.numel() / c)
    # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2:
    # the head's BN sees tiny variances where the one-pass form cancels badly.
    total = all_reduce(torch.cat([xf.sum(dims), count]))  # sums; gradients flow back
    n = total[-1]
    mean = total[:c] / n
    centred = xf - mean.view(shape)
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
    return y.to(x.dtype)


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
