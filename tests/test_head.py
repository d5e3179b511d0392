import pytest
import torch
from torch import nn

from scaling.model.head import BatchNormNoBeta, ProjectionHead, linear_classifier


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5])
def test_head_returns_every_layer(layers):
    head = ProjectionHead(32, layers, 8)
    outs = head(torch.randn(6, 32))
    assert len(outs) == layers + 1
    assert [o.shape[1] for o in outs] == [32] * layers + [8]
    for k, out in enumerate(outs):
        assert head.dim(k) == out.shape[1]


def test_reference_bn_relu_placement():
    head = ProjectionHead(16, 3, 4).train()
    h = torch.randn(64, 16)
    outs = head(h)
    # Middle layers end in ReLU; the last is a BN without beta and no ReLU.
    assert (outs[1] >= 0).all() and (outs[2] >= 0).all()
    assert (outs[3] < 0).any()
    for layer in head.layers:
        assert layer[0].bias is None
    assert isinstance(head.layers[-1][1], BatchNormNoBeta)
    assert not head.layers[-1][1].bias.requires_grad
    assert torch.equal(head.layers[-1][1].bias, torch.zeros(4))
    assert isinstance(head.layers[0][1], nn.BatchNorm1d) and head.layers[0][1].bias is not None
    # BN output with gamma = 1 and no beta has zero batch mean.
    assert torch.allclose(outs[3].mean(0), torch.zeros(4), atol=1e-5)


def test_head_init_std():
    head = ProjectionHead(512, 2, 128)
    assert abs(head.layers[0][0].weight.std().item() - 0.01) < 5e-4


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_truncated_matches_forward_output(k):
    head = ProjectionHead(16, 3, 4).eval()
    h = torch.randn(5, 16)
    assert torch.allclose(head.truncated(k)(h), head(h)[k])


def test_truncated_rejects_out_of_range():
    with pytest.raises(ValueError, match="k=4"):
        ProjectionHead(16, 3, 4).truncated(4)
    with pytest.raises(ValueError, match="num_layers=0"):
        ProjectionHead(16, 0)


def test_linear_classifier_zero_init():
    clf = linear_classifier(8, 3)
    assert torch.equal(clf(torch.randn(2, 8)), torch.zeros(2, 3))
