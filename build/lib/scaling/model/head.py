"""SimCLRv2's deep projection head and the supervised (linear) head.

Reference (tf2/model.py, ProjectionHead): middle layers are Linear(d, d, no bias)
-> BN -> ReLU; the last is Linear(d, out, no bias) -> BN without beta, no ReLU.
Weights ~ N(0, 0.01). The forward pass returns every layer's output so that
fine-tuning can start from layer k (the paper's ``ft_proj_selector``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaling.model.resnet import BN_EPS, BN_MOMENTUM


class BatchNormNoBeta(nn.BatchNorm1d):
    """BN with a learned scale but no shift (TF ``center=False``).

    The shift exists as a frozen zero parameter, so this is a plain BatchNorm1d to
    every tool that converts BN layers (SyncBatchNorm, global BN) and to the
    optimiser's BN exclusion, which skips parameters that need no gradient.
    """

    def __init__(self, num: int) -> None:
        super().__init__(num, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.bias.requires_grad_(False)


class ProjectionHead(nn.Module):
    """``num_layers`` Linear+BN layers; forward -> [h, z_1, ..., z_L].

    Index 0 is the encoder output itself, index L the contrastive embedding.
    """

    def __init__(self, in_dim: int, num_layers: int = 3, out_dim: int = 128) -> None:
        super().__init__()
        if not 1 <= num_layers <= 5:
            raise ValueError(f"num_layers={num_layers!r}; allowed: 1..5")
        layers: list[nn.Module] = []
        for j in range(num_layers):
            last = j == num_layers - 1
            dim = out_dim if last else in_dim
            linear = nn.Linear(in_dim, dim, bias=False)
            nn.init.normal_(linear.weight, std=0.01)
            norm = BatchNormNoBeta(dim) if last else nn.BatchNorm1d(
                dim, eps=BN_EPS, momentum=BN_MOMENTUM
            )
            layers.append(nn.Sequential(linear, norm))
        self.layers = nn.ModuleList(layers)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        outputs = [h]
        for j, layer in enumerate(self.layers):
            h = layer(h)
            if j != len(self.layers) - 1:
                h = F.relu(h)
            outputs.append(h)
        return outputs

    def truncated(self, k: int) -> nn.Sequential:
        """The first ``k`` layers (with their ReLUs) as one module, for fine-tuning.

        Fine-tuning from layer k keeps these layers' weights and trains them with
        the rest of the network; k = 0 is the encoder output (an empty module).
        """
        if not 0 <= k < len(self.layers) + 1:
            raise ValueError(f"head layer k={k!r}; allowed: 0..{len(self.layers)}")
        kept: list[nn.Module] = []
        for j in range(k):
            kept.append(self.layers[j])
            if j != len(self.layers) - 1:
                kept.append(nn.ReLU())
        return nn.Sequential(*kept)

    def dim(self, k: int) -> int:
        """Feature dimension at layer k."""
        if k == 0 or k < len(self.layers):
            first = self.layers[0]
            assert isinstance(first, nn.Sequential) and isinstance(first[0], nn.Linear)
            return first[0].in_features
        return self.out_dim


def linear_classifier(in_dim: int, num_classes: int) -> nn.Linear:
    """The supervised head: zero-initialised, as the reference fine-tunes it."""
    layer = nn.Linear(in_dim, num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
