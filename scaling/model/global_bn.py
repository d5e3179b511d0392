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


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over the workers, in place (no autograd: the backward below is written out)."""
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


class _GlobalNorm(torch.autograd.Function):
    """Normalise by the statistics of every worker's batch, as SyncBatchNorm's kernels
    do it but in plain torch ops (so gloo and NCCL run the same code): per-channel sums
    all_reduced in fp32 whatever autocast gives (bf16 sums of 10^6 values lose ~3
    digits). Only the input (in its own dtype) and two per-channel vectors are kept
    for the backward; fp32 temporaries live for one layer only (a plain autograd
    graph of these ops kept 2.5x R50's activations: fp32 copies at every BN)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        c = x.shape[1]
        # The count is filled on the device: a tensor built from a Python number is a
        # copy from the host, which waits for the GPU's queue at every BN layer.
        sums = _all_reduce(torch.cat([x.sum(dims, dtype=torch.float32),
                                      x.new_full((1,), x.numel() / c, dtype=torch.float32)]))
        n = sums[-1]
        mean = sums[:c] / n
        # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2: the
        # head's BN sees tiny variances where the one-pass form cancels badly.
        var = _all_reduce((x.float() - mean.view(shape)).square().sum(dims)) / n
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        y = torch.addcmul(shift.view(shape), x.float(), scale.view(shape)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.dims, ctx.shape = dims, shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)  # for the running statistics only
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        dyf = dy.float()
        local = torch.cat([dyf.sum(dims), (dyf * xhat).sum(dims)])  # this worker's sums
        # The affine parameters' gradients from this worker's batch: DDP averages them.
        c = len(mean)
        grad_weight = None if weight is None else local[c:].to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else local[:c].to(ctx.bias_dtype)
        total = _all_reduce(local.clone())  # every worker's: the statistics' gradient
        mean_dy, mean_dy_xhat = (total / n).chunk(2)
        w = invstd if weight is None else invstd * weight.float()
        dx = (dyf - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * w.view(shape)
        return dx.to(x.dtype), grad_weight, grad_bias, None


def _global_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not bn.training or world()[1] == 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            bn.training, bn.momentum or 0.0, bn.eps)
    y, mean, var = _GlobalNorm.apply(x, bn.weight, bn.bias, bn.eps)
    if bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            m = bn.momentum or 0.0
            n = x.numel() / x.shape[1] * world()[1]  # every worker's batch is the same size
            bn.running_mean.lerp_(mean, m)
            bn.running_var.lerp_(var * n / (n - 1), m)  # unbiased, as PyTorch
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
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
