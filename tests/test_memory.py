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


def test_the_memory_plan_shows_near_equal_runs_as_one_row():
    """Issue 37: '22.7 GiB; 2 cells' beside '22.6 GiB; 1 cells'."""
    from scaling.configure import load_config, resolve
    from scaling.study.memory import GiB, RunMemory, describe_memory
    from scaling.train.footprint import Footprint

    def run(stage: str, gib: float, cells: tuple[str, ...], batch: int = 256) -> RunMemory:
        return RunMemory(stage, "R50 1x", batch, Footprint(activations=int(gib * GiB)), cells)

    runs = [run("finetune", 20.0, ("a", "b")), run("finetune", 19.9, ("c",)),
            run("finetune", 12.0, ("d",)), run("pretrain", 20.0, ("e",)),
            run("finetune", 20.0, ("f",), batch=128)]
    text = describe_memory(runs, None, load_config(resolve("cifar10-gpu")))
    rows = text.splitlines()[1:]
    assert len(rows) == 4 and "3 cells" in rows[0] and "activations 20.0" in rows[0]
    assert rows[1].strip().startswith("finetune") and "1 cell)" in rows[1]  # 12 GiB: apart
    assert rows[2].strip().startswith("pretrain") and "128/GPU" in rows[3]
