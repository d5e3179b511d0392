import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tolerance import assert_close_at_scale

from scaling.train.losses import distillation_loss, nt_xent


def naive_nt_xent(z1, z2, t, extra=None):
    """SimCLR eq. 1 as a loop over the 2N anchors, at the reference's scale: the sum
    over all 2N anchors divided by N (= the mean of each direction, summed)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    q = None if extra is None else F.normalize(extra, dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = [torch.dot(z[i], z[k]) / t for k in range(2 * n) if k != i]
        if q is not None:
            sims += [torch.dot(z[i], q[k]) / t for k in range(q.shape[0])]
        total = total - (torch.dot(z[i], z[pos]) / t - torch.logsumexp(torch.stack(sims), 0))
    return total / n


def reference_nt_xent(z1, z2, t):
    """google-research/simclr tf2/objective.py add_contrastive_loss, transcribed:
    logits_aa/bb masked with LARGE_NUM on the diagonal, loss_a + loss_b, each a
    softmax cross-entropy averaged over the N anchors of its view."""
    large = 1e9
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = h1.shape[0]
    labels = F.one_hot(torch.arange(n), 2 * n).to(h1.dtype)
    masks = F.one_hot(torch.arange(n), n).to(h1.dtype)
    logits_aa = h1 @ h1.T / t - masks * large
    logits_bb = h2 @ h2.T / t - masks * large
    logits_ab, logits_ba = h1 @ h2.T / t, h2 @ h1.T / t

    def softmax_ce(lab, logits):
        return -(lab * F.log_softmax(logits, 1)).sum(1).mean()

    loss_a = softmax_ce(labels, torch.cat([logits_ab, logits_aa], 1))
    loss_b = softmax_ce(labels, torch.cat([logits_ba, logits_bb], 1))
    return loss_a + loss_b


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_equals_the_reference_formula(t):
    # float64 throughout: the check is of the formula, not of float32 rounding.
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(2))
    ours = nt_xent(z1, z2, t)
    assert torch.allclose(ours, reference_nt_xent(z1, z2, t), rtol=1e-10, atol=0)
    assert torch.allclose(ours, naive_nt_xent(z1, z2, t), rtol=1e-10, atol=0)


def test_nt_xent_float32_is_close_to_float64():
    g = torch.Generator().manual_seed(2)
    z1, z2 = (torch.randn(16, 8, generator=g, dtype=torch.float64) for _ in range(2))
    exact = nt_xent(z1, z2, 0.1)
    assert torch.allclose(nt_xent(z1.float(), z2.float(), 0.1).double(), exact, rtol=1e-5)


def test_nt_xent_with_extra_negatives_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    z1, z2, q = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (5, 5, 11))
    assert torch.allclose(nt_xent(z1, z2, 0.2, negatives=q), naive_nt_xent(z1, z2, 0.2, q),
                          rtol=1e-10, atol=0)


def test_closed_forms():
    # Computed in float64 so that the comparison is exact to 1e-12 on any CPU.
    # All embeddings equal: every logit is 1/t, so each direction is log(2N - 1).
    n = 6
    z = torch.ones(n, 4, dtype=torch.float64)
    assert math.isclose(nt_xent(z, z, 0.5).item(), 2 * math.log(2 * n - 1), rel_tol=1e-12)
    # One image: the positive is the only candidate, so the loss is 0.
    one = torch.randn(1, 3, dtype=torch.float64)
    assert nt_xent(one, -one, 0.1).item() == pytest.approx(0, abs=1e-12)
    # Orthonormal embeddings, views identical: positive logit 1/t, 2N - 2 negatives at 0.
    t = 0.25
    e = torch.eye(4, dtype=torch.float64)
    expected = -2 * (1 / t - math.log(math.exp(1 / t) + 2 * 4 - 2))
    assert nt_xent(e, e, t).item() == pytest.approx(expected, rel=1e-12)


def test_gradcheck():
    z1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3, negatives=q), (z1, z2))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="NxD"):
        nt_xent(torch.randn(3, 2), torch.randn(4, 2), 0.1)


def _worker(rank, world, init_file, z1, z2, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    n = z1.shape[0] // world
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = nt_xent(a, b, 0.2)
    loss.backward()
    # DDP averages gradients over workers; do the same by hand for the inputs.
    grads = torch.cat([a.grad, b.grad]) / world
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    out[rank] = (torch.stack(losses).mean(), grads)
    dist.destroy_process_group()


def test_two_workers_equal_one_worker_with_double_batch():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = nt_xent(a, b, 0.2)
    full.backward()
    with tempfile.TemporaryDirectory() as d:
        out = mp.Manager().dict()
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), z1, z2, out), nprocs=2)
    mean_loss = out[0][0]
    assert_close_at_scale(mean_loss, full.detach(), 1e-5, "loss")
    for rank in range(2):
        ga, gb = out[rank][1].chunk(2)
        assert_close_at_scale(ga, a.grad[rank * 4:(rank + 1) * 4], 1e-5, "grad z1")
        assert_close_at_scale(gb, b.grad[rank * 4:(rank + 1) * 4], 1e-5, "grad z2")


def test_distillation_closed_forms():
    s = torch.randn(5, 4)
    # Uniform teacher: the loss is the mean cross-entropy to uniform.
    expected = -(F.log_softmax(s / 2.0, 1)).mean(1).mean()
    assert_close_at_scale(distillation_loss(s, torch.zeros(5, 4), 2.0), expected, 1e-5)
    # Student equal to teacher: the loss is the teacher's entropy.
    p = F.softmax(s, 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert_close_at_scale(distillation_loss(s, s, 1.0), entropy, 1e-5)


def test_distillation_gradient_is_softmax_difference():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    tau = 0.5
    distillation_loss(s, t, tau).backward()
    expected = (F.softmax(s / tau, 1) - F.softmax(t / tau, 1)) / tau / 3
    assert_close_at_scale(s.grad, expected, 1e-5)
    assert t.grad is None or torch.all(t.grad == 0)  # the teacher is fixed


def test_distillation_label_mix():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    lab_logits, labels = torch.randn(2, 3), torch.tensor([0, 2])
    mixed = distillation_loss(s, t, 1.0, lab_logits, labels, alpha=0.3)
    expected = 0.3 * F.cross_entropy(lab_logits, labels) + 0.7 * distillation_loss(s, t, 1.0)
    assert_close_at_scale(mixed, expected, 1e-5)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, 1.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha=1.5"):
        distillation_loss(s, t, 1.0, lab_logits, labels, alpha=1.5)


def _bn_worker(rank, world, init_file, x, out):
    from scaling.model.global_bn import convert_global_bn

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    net = convert_global_bn(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1),
                                                torch.nn.BatchNorm2d(3)))
    n = x.shape[0] // world
    xs = x[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    y = net(xs)
    (y ** 3).sum().backward()
    grads = {k: p.grad / world for k, p in net.named_parameters()}  # DDP averages
    for g in grads.values():
        dist.all_reduce(g)
    out[rank] = (y.detach(), xs.grad, grads, net[1].running_mean.clone())
    dist.destroy_process_group()


def test_global_bn_on_two_cpu_workers_equals_one_big_batch():
    x = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    (y ** 3).sum().backward()
    with tempfile.TemporaryDirectory() as d:
        out = mp.Manager().dict()
        mp.spawn(_bn_worker, args=(2, os.path.join(d, "init"), x, out), nprocs=2)
    for rank in range(2):
        y_r, gx, grads, running = out[rank]
        sl = slice(rank * 4, (rank + 1) * 4)
        assert_close_at_scale(y_r, y.detach()[sl], 1e-5, "output")
        assert_close_at_scale(gx, xr.grad[sl], 1e-5, "input grad")
        # The conv bias's exact gradient is 0 (BN removes it): scale by the largest.
        largest = max(float(p.grad.abs().max()) for p in ref.parameters())
        for k, p in ref.named_parameters():
            assert_close_at_scale(grads[k] * 2, p.grad, 1e-5, k, largest)  # both halves
        assert_close_at_scale(running, ref[1].running_mean, 1e-5, "running_mean")
