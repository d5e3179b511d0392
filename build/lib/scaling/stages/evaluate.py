"""Evaluation: top-1 of a classifier, and kNN / linear probes of a frozen encoder.

Probes work on features extracted once from un-augmented images (centre view),
so they are cheap and deterministic. The linear probe is multinomial logistic
regression fitted by full-batch L-BFGS on standardised features; the paper's
linear evaluation trains with augmentation for 90 epochs instead, so our numbers
are a cheaper protocol (recorded as such in every result).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from scaling.data.batches import Fetcher, eval_batches
from scaling.data.splits import Splits
from scaling.train.env import Env, eval_mode

EVAL_BATCH = 1024


def apply(
    fn: Callable[[torch.Tensor], torch.Tensor], modules: list[torch.nn.Module], fetch: Fetcher,
    indices: np.ndarray, env: Env, shard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn`` on the images at ``indices`` (float in [0, 1], the evaluation
    view) in eval mode -> (outputs, labels), in the order of ``indices``.

    ``shard``: every worker of the group calls this, encodes its contiguous share of
    ``indices``, and all of them get every output (an all_gather): the probe's
    encoding then takes 1/world of the time one rank alone would hold the others
    waiting in a collective."""
    if shard and env.world > 1:
        share = -(-len(indices) // env.world)  # ceil
        mine = indices[env.rank * share:(env.rank + 1) * share]
        out, labels = apply(fn, modules, fetch, mine, env) if len(mine) else (None, None)
        return _gather_rows(out, labels, share, len(indices), env)
    outs, labels_ = [], []
    with eval_mode(*modules):
        for x, y in fetch.stream(eval_batches(indices, EVAL_BATCH)):
            with env.autocast():
                outs.append(fn(env.images(x.float().div_(255))).float())
            labels_.append(y)
    return torch.cat(outs), torch.cat(labels_)


def _gather_rows(out: torch.Tensor | None, labels: torch.Tensor | None, share: int, n: int,
                 env: Env) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's rows (``share`` each, the last possibly fewer), in rank order."""
    import torch.distributed as dist

    # The feature width is the same everywhere; a worker with no rows still sends a pad.
    width = torch.tensor([0 if out is None else out.shape[1]], device=env.device)
    dist.all_reduce(width, dist.ReduceOp.MAX)
    rows = torch.zeros(share, int(width), device=env.device)
    tags = torch.full((share,), -1, dtype=torch.long, device=env.device)
    if out is not None and labels is not None:
        rows[:len(out)], tags[:len(labels)] = out, labels.long()
    all_rows = [torch.empty_like(rows) for _ in range(env.world)]
    all_tags = [torch.empty_like(tags) for _ in range(env.world)]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_tags, tags)
    return torch.cat(all_rows)[:n], torch.cat(all_tags)[:n]


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def split_top1(
    nets: dict[str, torch.nn.Module], splits: Splits, train_fetch: Fetcher, env: Env
) -> dict[str, float | None]:
    """``{prefix}val_top1`` (None without a validation split) and ``{prefix}test_top1``
    for each ``prefix: net``; ``train_fetch`` serves the training split (validation)."""
    test_fetch = train_fetch.like(splits.test)
    out: dict[str, float | None] = {}
    for prefix, net in nets.items():
        out[f"{prefix}val_top1"] = None
        if len(splits.val):
            out[f"{prefix}val_top1"] = top1(*apply(net, [net], train_fetch, splits.val, env))
        test = apply(net, [net], test_fetch, np.arange(len(splits.test)), env)
        out[f"{prefix}test_top1"] = top1(*test)
    return out


def knn_accuracy(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
    test_labels: torch.Tensor, classes: int, k: int = 200, temperature: float = 0.1,
) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018): vote exp(s / T) per class."""
    train = F.normalize(train, dim=1)
    test = F.normalize(test, dim=1)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], 1024):
        sims = test[start:start + 1024] @ train.T  # BxN
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(top.shape[0], classes, device=test.device)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start:start + 1024]).sum())
    return correct / test.shape[0]


def linear_probe(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
    test_labels: torch.Tensor, classes: int, steps: int = 100, weight_decay: float = 1e-4,
) -> float:
    """Logistic regression on frozen features (L-BFGS, standardised inputs) -> test top-1."""
    predict = fit_linear_probe(train, train_labels, classes, steps, weight_decay)
    return top1(predict(test), test_labels)


def fit_linear_probe(
    train: torch.Tensor, train_labels: torch.Tensor, classes: int, steps: int = 100,
    weight_decay: float = 1e-4,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit once, evaluate on several splits: features -> logits."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    xtr = (train - mean) / std
    w = torch.zeros(xtr.shape[1], classes, device=xtr.device, requires_grad=True)
    b = torch.zeros(classes, device=xtr.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_labels) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda x: ((x - mean) / std) @ w + b
