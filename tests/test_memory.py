import torch
from torch import nn

from scaling.train.memory import NegativeQueue, ema_update, momentum_copy


def test_queue_is_fifo_and_only_filled_slots_are_used():
    q = NegativeQueue(5, 2)
    assert q.negatives() is None
    q.push(torch.tensor([[1.0, 0], [2, 0]]), gather=False)
    assert q.negatives().tolist() == [[1, 0], [2, 0]]
    q.push(torch.tensor([[3.0, 0], [4, 0], [5, 0], [6, 0]]), gather=False)
    # Capacity 5: the oldest key (1) was overwritten by the newest (6).
    assert sorted(q.negatives()[:, 0].tolist()) == [2, 3, 4, 5, 6]
    state = q.state_dict()
    fresh = NegativeQueue(5, 2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.negatives(), q.negatives()) and int(fresh.ptr) == 1


def test_queue_keeps_latest_when_batch_exceeds_size():
    q = NegativeQueue(3, 1)
    q.push(torch.arange(7.0)[:, None], gather=False)
    assert sorted(q.negatives()[:, 0].tolist()) == [4, 5, 6]


def test_ema_update_closed_form_and_buffers():
    online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(3.0)
    ema_update(target, online, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)
    assert torch.equal(target[1].running_mean, torch.full((2,), 3.0))
