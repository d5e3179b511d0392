import copy
import math

import pytest
import torch
from torch import nn

from scaling.config import LAYERS
from scaling.model.resnet import (
    Bottleneck,
    ResNet,
    SelectiveKernel,
    count_parameters,
)


def count_tf_variables(module: nn.Module) -> int:
    """Parameters plus BN moving statistics: what the reference's table counts.

    The TF checkpoints hold moving mean/variance as variables; with them every
    row of the reference table reproduces (R152 2x: 232.25M params, 232.56M
    variables, listed as 233M). ``num_batches_tracked`` has no TF counterpart.
    """
    buffers = sum(
        b.numel() for name, b in module.named_buffers() if not name.endswith("num_batches_tracked")
    )
    return count_parameters(module) + buffers


# Reference README (google-research/simclr), model size without heads, in millions.
# The TF count includes BN moving statistics (see count_tf_variables).
REFERENCE = [
    (50, 1, False, 24), (50, 1, True, 35), (50, 2, False, 94), (50, 2, True, 140),
    (101, 1, False, 43), (101, 1, True, 65), (101, 2, False, 170), (101, 2, True, 257),
    (152, 1, False, 58), (152, 1, True, 89), (152, 2, False, 233), (152, 2, True, 354),
    (152, 3, True, 795),
]


@pytest.mark.parametrize(("depth", "width", "sk", "millions"), REFERENCE)
def test_parameter_counts_match_reference_table(depth, width, sk, millions):
    with torch.device("meta"):  # shapes only: R152 3x+SK would be 3 GB
        model = ResNet(depth, width, 0.0625 if sk else 0.0)
    assert round(count_tf_variables(model) / 1e6) == millions
    # Trainable parameters alone are within 2.1% (R50 1x: 23.5M listed as 24M).
    assert abs(count_parameters(model) / 1e6 - millions) / millions < 0.021


def test_r50_matches_torchvision_without_fc():
    # Without SK our R50 is torchvision's v1.5 ResNet-50 minus the classifier.
    from torchvision.models import resnet50

    with torch.device("meta"):
        ours = ResNet(50, 1.0)
        theirs = resnet50()
    fc = sum(p.numel() for p in theirs.fc.parameters())
    assert count_parameters(ours) == count_parameters(theirs) - fc


@pytest.mark.parametrize("depth", sorted(LAYERS))
@pytest.mark.parametrize("sk", [0.0, 0.0625])
def test_every_depth_runs_at_fractional_width(depth, sk):
    model = ResNet(depth, 1 / 16, sk, stem="small", in_channels=1)
    x = torch.rand(2, 1, 16, 16)
    out = model(x)
    expansion = 4 if LAYERS[depth][0] == "bottleneck" else 1
    assert out.shape == (2, 512 * expansion // 16)
    assert model.feature_dim == out.shape[1]


@pytest.mark.parametrize("stem", ["imagenet", "small"])
@pytest.mark.parametrize("sk", [0.0, 0.0625])
def test_stems_and_channels(stem, sk):
    model = ResNet(18, 0.25, sk, stem=stem, in_channels=3).eval()
    size = 64 if stem == "imagenet" else 32
    assert model(torch.rand(2, 3, size, size)).shape == (2, 128)
    convs = [m for m in model.stem if isinstance(m, nn.Conv2d)]
    if stem == "small":
        assert [c.kernel_size for c in convs] == [(3, 3)] and convs[0].stride == (1, 1)
    elif sk:  # ResNet-D: three 3x3 convs, 32w, 32w, 64w
        assert [c.out_channels for c in convs] == [8, 8, 16]
    else:
        assert convs[0].kernel_size == (7, 7) and convs[0].stride == (2, 2)


def test_no_conv_biases_and_zero_init_last_gamma():
    model = ResNet(50, 0.25, 0.0625)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == sum(LAYERS[50][1])
    for b in blocks:
        assert torch.all(b.body[-1].weight == 0)
    # Zero last gamma: every block is the identity on its residual branch at init,
    # so shortcut-free blocks pass their input through ReLU unchanged.
    x = torch.rand(2, 64, 8, 8)
    assert torch.equal(blocks[1](x), torch.relu(x))


def test_variance_scaling_init():
    model = ResNet(50, 1.0)
    conv = model.groups[3][0].body[4]  # 1x1 conv 512 -> 2048, fan_in 512
    w = conv.weight
    assert w.shape == (2048, 512, 1, 1)
    # Truncated normal rescaled so the *truncated* std is sqrt(1 / fan_in).
    assert math.isclose(w.std().item(), math.sqrt(1 / 512), rel_tol=0.02)
    limit = 2 * math.sqrt(1 / 512) / 0.87962566103423978
    assert w.abs().max().item() <= limit + 1e-6


def test_selective_kernel_mixes_two_streams():
    sk = SelectiveKernel(8, 4, 1, 0.0625)
    assert sk.reduce.out_channels == 32  # max(int(4 * 0.0625), 32)
    x = torch.rand(3, 8, 6, 6)
    y = sk(x)
    streams = torch.relu(sk.bn(sk.conv(x))).chunk(2, 1)
    # The output is a per-channel convex combination of the two streams.
    lo = torch.minimum(*streams)
    hi = torch.maximum(*streams)
    assert y.shape == (3, 4, 6, 6)
    assert torch.all(y >= lo - 1e-6) and torch.all(y <= hi + 1e-6)


def test_resnet_d_shortcut_uses_avgpool_including_stride_one_group():
    model = ResNet(50, 0.25, 0.0625)
    first = model.groups[0][0].shortcut
    assert type(first[0]).__name__ == "AvgPoolSame" and first[0].stride == 1
    x = torch.ones(1, 2, 5, 5)
    # SAME pooling excludes padding: a constant image stays constant.
    assert torch.allclose(first[0](x), x)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="depth=42"):
        ResNet(42)
    with pytest.raises(ValueError, match="stem='tiny'"):
        ResNet(18, stem="tiny")  # type: ignore[arg-type]


def test_activation_checkpointing_changes_memory_not_results():
    """Recomputed groups: the same output, gradients and BN running statistics
    (moved once, not twice), and fewer tensors saved for the backward."""
    from tolerance import assert_close_at_scale

    torch.manual_seed(0)
    plain = ResNet(18, 0.25, stem="small", in_channels=3)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint_blocks = True
    x = torch.rand(8, 3, 16, 16)
    saved = {}
    for name, net in (("plain", plain), ("ckpt", ckpt)):
        count = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, c=count: c.append(t.numel()) or t, lambda t: t):
            out = net(x)
        saved[name] = sum(count)
        out.square().mean().backward()
    assert saved["ckpt"] < saved["plain"] / 2
    assert_close_at_scale(ckpt(x), plain(x), 1e-5, "output")
    for (k, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert_close_at_scale(b.grad, a.grad, 1e-5, k)
    for (k, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        if "num_batches" in k:
            assert torch.equal(a, b), k
        else:
            assert_close_at_scale(b, a, 1e-5, k)
