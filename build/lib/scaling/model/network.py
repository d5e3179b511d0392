"""The networks each stage trains, composed from encoder, head and classifier.

Modules are built from explicit arguments; what a later stage needs (which head
layer to fine-tune from) is a constructor parameter, never a mode flag.
"""

from __future__ import annotations

import torch
from torch import nn

from scaling.config import HeadConfig, ModelConfig
from scaling.model.head import ProjectionHead, linear_classifier
from scaling.model.resnet import ResNet


def build_encoder(cfg: ModelConfig, in_channels: int, image_size: int) -> ResNet:
    return ResNet(cfg.depth, cfg.width, cfg.sk_ratio, cfg.resolved_stem(image_size), in_channels)


class ContrastiveNet(nn.Module):
    """Encoder + projection head: images -> [h, z_1, ..., z_L]."""

    def __init__(self, encoder: ResNet, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.encoder(x))


def build_contrastive(
    model: ModelConfig, head: HeadConfig, in_channels: int, image_size: int
) -> ContrastiveNet:
    enc = build_encoder(model, in_channels, image_size)
    return ContrastiveNet(enc, ProjectionHead(enc.feature_dim, head.num_layers, head.out_dim))


class Classifier(nn.Module):
    """Encoder -> first k head layers -> linear classifier: images -> logits.

    Fine-tuning keeps (and trains) head layers 1..k, the paper's "fine-tune from
    a middle layer of the projection head"; k = 0 classifies the encoder output.
    """

    def __init__(self, encoder: ResNet, head: nn.Sequential, feature_dim: int, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.classifier = linear_classifier(feature_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.encoder(x)))


def build_classifier(
    model: ModelConfig, head: HeadConfig, head_layer: int, in_channels: int, image_size: int,
    classes: int,
) -> Classifier:
    """A freshly initialised classifier of the fine-tuned shape (supervised, student)."""
    net = build_contrastive(model, head, in_channels, image_size)
    return classifier_from(net, head_layer, classes)


def classifier_from(net: ContrastiveNet, head_layer: int, classes: int) -> Classifier:
    """Reuse a (pretrained) contrastive net's encoder and first ``head_layer`` layers."""
    return Classifier(
        net.encoder, net.head.truncated(head_layer), net.head.dim(head_layer), classes
    )
