import copy
import math

import pytest
import torch
from tolerance import assert_close_at_scale
from torch import nn

from scaling.config import OptimConfig
from scaling.train.lars import LARS, param_groups
from scaling.train.schedule import LRSchedule, scaled_lr, warmup_cosine


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # Deliberately misleading names: exclusion must not depend on them.
        self.bn_like_name = nn.Linear(3, 4)
        self.weights = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)


def test_param_groups_exclude_by_type_and_shape_not_name():
    net = Net()
    adapted, plain = param_groups(net, 1e-4, exclude=[net.head])
    ids = {id(p) for p in adapted["params"]}
    assert ids == {id(net.bn_like_name.weight)}
    assert {id(p) for p in plain["params"]} == {
        id(net.bn_like_name.bias), id(net.weights.weight), id(net.weights.bias),
        id(net.head.weight), id(net.head.bias),
    }
    assert plain["weight_decay"] == 0.0 and not plain["lars"]


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_step_matches_hand_computation(foreach):
    w = torch.tensor([3.0, 4.0], requires_grad=True)  # ||w|| = 5
    b = torch.tensor([1.0], requires_grad=True)
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars": True},
                {"params": [b], "weight_decay": 0.0, "lars": False}],
               lr=2.0, momentum=0.9, eta=0.001, foreach=foreach)
    w.grad = torch.tensor([0.0, 1.0])
    b.grad = torch.tensor([0.5])
    opt.step()
    g = torch.tensor([0.3, 1.4])  # grad + wd * w
    trust = 0.001 * 5 / math.sqrt(0.3**2 + 1.4**2)
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 2.0 * trust * g)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 2.0 * 0.5]))
    # Second step: momentum holds the lr-scaled update (TF convention).
    v_b = 2.0 * 0.5
    b.grad = torch.tensor([0.5])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([0.0 - (0.9 * v_b + 1.0)]))


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_trust_ratio_is_one_for_zero_weights(foreach):
    w = torch.zeros(3, requires_grad=True)
    opt = LARS([w], lr=0.5, momentum=0.0, foreach=foreach)
    w.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3,), -0.5))


@pytest.mark.parametrize("nesterov", [False, True])
def test_multi_tensor_lars_follows_the_reference_loop_on_a_resnet(nesterov):
    # Ten steps of both on a ResNet with its head (conv, BN, bias and excluded
    # classifier tensors; one with no gradient): equal to float32 rounding.
    from scaling.config import HeadConfig, ModelConfig
    from scaling.model.network import build_contrastive

    torch.manual_seed(0)
    ref = build_contrastive(ModelConfig(depth=18, width=0.125), HeadConfig(), 3, 16)
    fused, start = copy.deepcopy(ref), copy.deepcopy(ref)
    opts = [LARS(param_groups(net, 1e-4), lr=0.0, momentum=0.9, nesterov=nesterov,
                 foreach=foreach) for net, foreach in ((ref, False), (fused, True))]
    x = torch.rand(8, 3, 16, 16)
    for step in range(10):
        for net, opt in zip((ref, fused), opts, strict=True):
            for group in opt.param_groups:
                group["lr"] = 0.5 * (step + 1)
            opt.zero_grad()
            net(x)[-1].square().mean().backward()
            next(net.encoder.stem.parameters()).grad = None  # a tensor without a gradient
            opt.step()
    for a, b in zip(ref.parameters(), fused.parameters(), strict=True):
        assert_close_at_scale(b, a, 1e-5)
    moved = [not torch.equal(a, s) for a, s in zip(ref.parameters(), start.parameters(),
                                                   strict=True)]
    assert not moved[0] and sum(moved) > len(moved) // 2


def test_lars_resumes_a_checkpoint_written_before_the_foreach_option():
    w = torch.ones(4, requires_grad=True)
    opt = LARS([w], lr=0.1)
    w.grad = torch.ones(4)
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["foreach"]  # as saved by the earlier optimiser
    again = LARS([w], lr=0.1)
    again.load_state_dict(state)
    w.grad = torch.ones(4)
    again.step()  # no KeyError; the multi-tensor path
    assert torch.isfinite(w).all()


def test_lars_rejects_bad_lr():
    with pytest.raises(ValueError, match="lr=-1"):
        LARS([torch.zeros(1, requires_grad=True)], lr=-1)


def test_warmup_cosine_shape():
    peak, total, warm = 2.0, 100, 10
    assert warmup_cosine(0, peak, total, warm) == 0.0
    assert warmup_cosine(5, peak, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(10, peak, total, warm) == pytest.approx(peak)
    assert warmup_cosine(55, peak, total, warm) == pytest.approx(peak / 2)
    assert warmup_cosine(100, peak, total, warm) == pytest.approx(0.0, abs=1e-12)
    lrs = [warmup_cosine(s, peak, total, warm) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    with pytest.raises(ValueError, match="warmup_steps=200"):
        warmup_cosine(0, peak, total, 200)


def test_lr_scaling_uses_global_batch():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.1, 4096, "sqrt") == pytest.approx(6.4)  # the paper's pretraining LR
    with pytest.raises(ValueError, match="'cubic'"):
        scaled_lr(0.1, 256, "cubic")  # type: ignore[arg-type]


def test_a_stage_schedule_scales_by_the_global_batch_and_warms_up_its_fraction():
    # base 0.1 x sqrt(256) = 1.6 at the end of a 5-step warmup (5% of 100 steps).
    s = LRSchedule.of(OptimConfig(base_lr=0.1, lr_scaling="sqrt", warmup_fraction=0.05), 256, 100)
    assert (s.peak, s.total, s.warmup) == (pytest.approx(1.6), 100, 5)
    assert s(0) == 0.0 and s(5) == pytest.approx(1.6) and s(100) == pytest.approx(0.0, abs=1e-12)
    assert s(40) == warmup_cosine(40, s.peak, 100, 5)
