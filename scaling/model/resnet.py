"""The SimCLRv2 ResNet family, ported from the reference's tf2/resnet.py.

Depths 18/34 use basic blocks, 50-200 bottlenecks ("v1.5": the stride sits on the
3x3 conv). A width multiplier scales every channel count; fractional widths
(1/16 ... 1/2) keep the paper's depths at CPU scale. ``sk_ratio > 0`` turns on
selective kernels *and* ResNet-D (3-conv stem, avgpool shortcuts), exactly as the
reference couples them. SK in basic blocks is our extension: the reference only
has SK in bottlenecks.

The encoder returns the pooled feature vector (dim 2048*w for bottlenecks,
512*w for basic blocks); heads live in ``head.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scaling.config import LAYERS

Stem = Literal["imagenet", "small"]

# TF "decay 0.9" is PyTorch momentum 0.1; eps as in the reference.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
# The SK attention bottleneck never gets narrower than this (reference min_dim).
SK_MIN_DIM = 32


def channels(base: int, width: float) -> int:
    """Channel count ``base * width``, at least 1 (fractional widths round)."""
    return max(1, int(round(base * width)))


def bn(num: int, zero_init: bool = False) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(num, eps=BN_EPS, momentum=BN_MOMENTUM)
    if zero_init:
        # Zero gamma on the last BN of a block: each residual block starts as
        # the identity, which the reference does for every block.
        nn.init.zeros_(layer.weight)
    return layer


def conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # Same output size as TF's conv2d_fixed_padding for odd kernels; no bias
    # because a BN always follows.
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, groups=groups)


class SelectiveKernel(nn.Module):
    """SK conv: one 3x3 conv to 2F channels seen as two streams, mixed per channel.

    x: NxCxHxW -> conv(stride) -> 2 streams of F -> sum -> GAP -> 1x1 (mid) -> BN-ReLU
    -> 1x1 (2F, no BN) -> softmax over the 2 streams -> weighted sum: NxFxH'xW'.
    The output is already BN-ReLU'd inside each stream, as in the reference.
    """

    def __init__(self, cin: int, filters: int, stride: int, sk_ratio: float) -> None:
        super().__init__()
        mid = max(int(filters * sk_ratio), SK_MIN_DIM)
        self.conv = conv(cin, 2 * filters, 3, stride)
        self.bn = bn(2 * filters)
        self.reduce = nn.Conv2d(filters, mid, 1, bias=False)
        self.reduce_bn = bn(mid)
        self.expand = nn.Conv2d(mid, 2 * filters, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        streams = torch.stack(x.chunk(2, dim=1))  # 2xNxFxHxW
        pooled = streams.sum(0).mean((2, 3), keepdim=True)  # NxFx1x1
        mixing = self.expand(F.relu(self.reduce_bn(self.reduce(pooled))))  # Nx2Fx1x1
        mixing = torch.stack(mixing.chunk(2, dim=1)).softmax(0)  # 2xNxFx1x1
        return (streams * mixing).sum(0)


class AvgPoolSame(nn.Module):
    """ResNet-D's 2x2 average pool before a projection shortcut.

    Stride 2: pad right/bottom by one with zeros then VALID (the reference's
    FixedPadding(2)); stride 1: TF 'SAME', where padded cells are not counted.
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (0, 1, 0, 1))
        if self.stride > 1:
            return F.avg_pool2d(padded, 2, self.stride)
        ones = F.pad(torch.ones_like(x[:1, :1]), (0, 1, 0, 1))
        return F.avg_pool2d(padded, 2, 1) / F.avg_pool2d(ones, 2, 1)


def shortcut(cin: int, cout: int, stride: int, resnet_d: bool) -> nn.Sequential:
    if resnet_d:
        return nn.Sequential(AvgPoolSame(stride), conv(cin, cout, 1), bn(cout))
    return nn.Sequential(conv(cin, cout, 1, stride), bn(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, cin: int, filters: int, stride: int, projection: bool, sk_ratio: float
    ) -> None:
        super().__init__()
        self.shortcut = shortcut(cin, filters, stride, sk_ratio > 0) if projection else None
        first: nn.Module
        if sk_ratio > 0:  # our extension: SK on the first 3x3 of a basic block
            first = SelectiveKernel(cin, filters, stride, sk_ratio)
        else:
            first = nn.Sequential(conv(cin, filters, 3, stride), bn(filters), nn.ReLU())
        self.body = nn.Sequential(first, conv(filters, filters, 3), bn(filters, zero_init=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.body(x) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, cin: int, filters: int, stride: int, projection: bool, sk_ratio: float
    ) -> None:
        super().__init__()
        out = 4 * filters
        self.shortcut = shortcut(cin, out, stride, sk_ratio > 0) if projection else None
        middle: nn.Module
        if sk_ratio > 0:
            middle = SelectiveKernel(filters, filters, stride, sk_ratio)
        else:
            middle = nn.Sequential(conv(filters, filters, 3, stride), bn(filters), nn.ReLU())
        self.body = nn.Sequential(
            conv(cin, filters, 1), bn(filters), nn.ReLU(),
            middle,
            conv(filters, out, 1), bn(out, zero_init=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.body(x) + identity)


def make_stem(in_channels: int, width: float, stem: Stem, resnet_d: bool) -> nn.Sequential:
    c = channels(64, width)
    if stem == "small":  # <= 32 px images: 3x3/1, no maxpool (reference cifar_stem)
        return nn.Sequential(conv(in_channels, c, 3), bn(c), nn.ReLU())
    if resnet_d:  # ResNet-D deep stem: 3x3/2 (32w), 3x3 (32w), 3x3 (64w)
        half = max(1, c // 2)
        layers: list[nn.Module] = [
            conv(in_channels, half, 3, 2), bn(half), nn.ReLU(),
            conv(half, half, 3), bn(half), nn.ReLU(),
            conv(half, c, 3), bn(c), nn.ReLU(),
        ]
    else:
        layers = [conv(in_channels, c, 7, 2), bn(c), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(3, 2, padding=1))


class ResNet(nn.Module):
    """Encoder: image NxCxHxW -> features Nx``feature_dim``."""

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        sk_ratio: float = 0.0,
        stem: Stem = "imagenet",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"depth={depth!r} is not supported; allowed: {sorted(LAYERS)}")
        if width <= 0 or channels(64, width) < 1:
            raise ValueError(f"width={width!r} must be > 0")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem={stem!r}; allowed: 'imagenet', 'small'")
        kind, blocks = LAYERS[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self.stem = make_stem(in_channels, width, stem, resnet_d=sk_ratio > 0)
        cin = channels(64, width)
        groups = []
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2), strict=True)):
            filters = channels(64 * 2**i, width)
            # The reference gives the first block of every group a projection
            # shortcut, even where shapes already match (group 1 of ResNet-18).
            group = [block(cin, filters, stride, True, sk_ratio)]
            cin = filters * block.expansion
            group += [block(cin, filters, 1, False, sk_ratio) for _ in range(n - 1)]
            groups.append(nn.Sequential(*group))
        self.groups = nn.Sequential(*groups)
        self.feature_dim = cin
        # Recompute each block's activations in the backward instead of keeping them
        # (runtime.activation_checkpointing): only the blocks' inputs stay saved, and
        # one block's activations at a time are rebuilt (per group is too coarse: R152's
        # third group holds 36 blocks, and recomputing it whole is most of the memory).
        self.checkpoint_blocks = False
        init_variance_scaling(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if not (self.checkpoint_blocks and self.training and torch.is_grad_enabled()):
            return self.groups(x).mean((2, 3))
        # Compiled, the BN update is applied once, in the forward graph (the backward's
        # recomputation rebuilds activations only), and torch.compile refuses this
        # context_fn: it is needed, and passed, only in eager mode.
        eager = not torch.compiler.is_compiling()
        for block in self.blocks():
            if eager:
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=functools.partial(_recompute_without_bn_update, block))
            else:  # Dynamo takes no context_fn argument at all, not even the default
                x = checkpoint(block, x, use_reentrant=False)
        return x.mean((2, 3))

    def blocks(self) -> list[nn.Module]:
        return [block for group in self.groups.children() for block in group.children()]


def _recompute_without_bn_update(block: nn.Module
                                 ) -> tuple[contextlib.AbstractContextManager[None],
                                            contextlib.AbstractContextManager[None]]:
    """Checkpointing runs a block's forward twice; BN's running statistics must move
    once (momentum 0 in the recomputation leaves them as the first pass left them)."""
    return contextlib.nullcontext(), _frozen_bn_statistics(block)


@contextlib.contextmanager
def _frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [(m.momentum, m.num_batches_tracked) for m in norms]
    for m in norms:
        m.momentum = 0.0
        if m.num_batches_tracked is not None:
            m.num_batches_tracked = m.num_batches_tracked.clone()
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, kept, strict=True):
            m.momentum, m.num_batches_tracked = momentum, tracked


def init_variance_scaling(module: nn.Module) -> None:
    """Keras VarianceScaling(scale=1, fan_in, truncated_normal) on every conv.

    The truncated normal is cut at 2 std, so its std is divided by the std of a
    unit normal truncated to [-2, 2] (0.8796...), exactly as Keras does.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:  # meta: shapes, no values
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
