"""The pixel arm: the baseline that uses no network and no pretraining. Ridge
regression and k-nearest neighbours on the raw pixels of exactly the cell's labelled
subset, the ridge strength, k and the arm chosen on validation. Closed forms, so it
costs seconds where a network costs minutes, and it depends on the data and the
labelled subset only: one run serves every model of a study (its key has no seed and
no model, scaling.stages.registry).

The maths are pure functions of tensors (``ridge_fits``, ``knn_votes``); ``pixels``
is the stage around them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scaling.catalog import CATALOG
from scaling.configure import to_dict
from scaling.data.batches import Fetcher
from scaling.data.splits import labelled_subset, load_splits
from scaling.data.subsets import save_indices
from scaling.records import StageResult
from scaling.stage_result import write_result
from scaling.stages.evaluate import apply
from scaling.stages.stage_run import StageInputs, labels_protocol
from scaling.train.measure import peak_memory_bytes


def ridge_fits(x: torch.Tensor, y: torch.Tensor, classes: int, grid: tuple[float, ...]
               ) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """Ridge regression of one-hot labels on ``x`` (n x d) for every strength in
    ``grid`` -> {strength: (weight d x C, bias C)}, predicting ``x @ weight + bias``.
    Strengths are in units of the mean squared norm of a centred row, so the grid is
    scale-free. In float64 from one eigendecomposition of the d x d Gram matrix."""
    x64 = x.double().cpu()
    mean = x64.mean(0)
    xc = x64 - mean
    onehot = F.one_hot(y.long().cpu(), classes).double()
    ybar = onehot.mean(0)
    gram = xc.T @ xc
    s, v = torch.linalg.eigh(gram)
    s = s.clamp_min(0)  # rounding can leave tiny negative eigenvalues of a PSD matrix
    scale = float(gram.trace()) / max(len(x64), 1) or 1.0
    proj = v.T @ (xc.T @ (onehot - ybar))
    out = {}
    for lam in grid:
        w = v @ (proj / (s + lam * scale)[:, None])
        out[lam] = (w.float(), (ybar - mean @ w).float())
    return out


def knn_votes(train: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, classes: int,
              ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Predicted class of every query by a majority of its k nearest training rows
    (Euclidean), for every k in ``ks`` (capped at the training rows); a tie goes to
    the class whose voters rank nearer (the larger sum of k - rank)."""
    kmax = min(max(ks), len(train))
    sq = train.square().sum(1)
    near = []
    for start in range(0, len(queries), 1024):
        q = queries[start:start + 1024]
        d2 = sq[None, :] - 2 * q @ train.T  # + |q|^2: the same for every row of q
        near.append(d2.topk(kmax, dim=1, largest=False).indices)
    idx = torch.cat(near)
    voters = labels.long()[idx]  # queries x kmax, nearest first
    out = {}
    for asked in ks:
        k = min(asked, kmax)
        # One vote each, plus a tie-breaker below one vote that favours nearer ranks.
        weight = 1 + (k - torch.arange(k, dtype=torch.float64)) / (k * (k + 1))
        votes = torch.zeros(len(queries), classes, dtype=torch.float64)
        votes.scatter_add_(1, voters[:, :k].cpu(), weight.expand(len(queries), k).contiguous())
        out[asked] = votes.argmax(1)
    return out


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.cpu() == y.cpu()).double().mean()) if len(y) else float("nan")


def pixel_features(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """The evaluation view as a flat vector, area-averaged to ``max_side`` first."""
    if x.shape[-1] > max_side or x.shape[-2] > max_side:
        x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], max_side), min(x.shape[-1], max_side)))
    return x.flatten(1)


def pixels(job: StageInputs) -> StageResult:
    """Ridge and kNN on the cell's labelled pixels; the arm with the better validation
    top-1 is the stage's classifier (``val_top1``, ``test_top1``)."""
    cfg, out, env = job.cfg, job.out, job.env
    started = time.perf_counter()
    px = cfg.pixels
    # Raw pixels: an in-memory set at its native size, whatever data.image_size upscales
    # the networks' input to (the labelled indices are the same either way).
    native = CATALOG[cfg.data.name].in_memory
    splits = load_splits(dataclasses.replace(cfg.data, image_size=None)) if native else job.splits
    labelled = labelled_subset(cfg, splits)
    if env.is_main:
        save_indices(out / "labels.txt", labelled)
    fetch = Fetcher.of(splits.train, env.device, cfg.runtime, env.cpus)
    classes = splits.train.num_classes

    def features(f: Fetcher, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return apply(lambda x: pixel_features(x, px.max_side), [], f, idx, env, shard=True)

    x, y = features(fetch, labelled)
    evals = {"test": features(fetch.like(splits.test), np.arange(len(splits.test)))}
    has_val = len(splits.val) > 0
    if has_val:
        evals["val"] = features(fetch, splits.val)
    fit_started = time.perf_counter()
    ridge = ridge_fits(x, y, classes, px.ridge_grid)
    top1: dict[str, dict[str, dict[Any, float]]] = {"ridge": {}, "knn": {}}
    for split, (xs, ys) in evals.items():
        top1["ridge"][split] = {lam: _accuracy((xs.cpu() @ w + b).argmax(1), ys)
                                for lam, (w, b) in ridge.items()}
        top1["knn"][split] = {k: _accuracy(p, ys) for k, p in
                              knn_votes(x, y, xs, classes, px.knn_k).items()}
    fit_seconds = time.perf_counter() - fit_started

    # Without validation nothing is chosen: a fixed middle strength, 1-NN, the ridge arm.
    lam = (max(px.ridge_grid, key=lambda v: top1["ridge"]["val"][v]) if has_val
           else px.ridge_grid[len(px.ridge_grid) // 2])
    k = max(px.knn_k, key=lambda v: top1["knn"]["val"][v]) if has_val else px.knn_k[0]
    arm = ("knn" if has_val and top1["knn"]["val"][k] > top1["ridge"]["val"][lam]
           else "ridge")
    chosen = {"ridge": lam, "knn": k}
    pick = {name: {s: top1[name][s][chosen[name]] for s in evals} for name in top1}
    val_of = {name: top1[name].get("val", {}) for name in top1}
    d = x.shape[1]
    metrics: dict[str, Any] = {
        "params": d * classes + classes, "params_with_head": d * classes + classes,
        "forward_flops_per_image": 2 * d * classes, "labelled_examples": len(labelled),
        "val_top1": pick[arm]["val"] if has_val else None, "test_top1": pick[arm]["test"],
        "pixel_ridge_val_top1": pick["ridge"]["val"] if has_val else None,
        "pixel_ridge_top1": pick["ridge"]["test"],
        "pixel_knn_val_top1": pick["knn"]["val"] if has_val else None,
        "pixel_knn_top1": pick["knn"]["test"],
        # Images the fits and the evaluation went through, per second of fitting.
        "images_per_s": (len(x) + sum(len(v[1]) for v in evals.values())) / max(fit_seconds,
                                                                                1e-9),
        "train_seconds": fit_seconds, "wall_seconds": time.perf_counter() - started,
        "peak_memory_bytes": peak_memory_bytes(env.device), "final_loss": None,
    }
    protocol = {
        **labels_protocol(cfg), "subset_file": cfg.finetune.subset_file, "features": d,
        "max_side": px.max_side, "native_size": native, "val_size": len(splits.val),
        "val_seed": cfg.data.val_seed,
        "arm": arm, "ridge_strength": lam, "knn_k": k,
        "chosen_on": "validation top-1" if has_val else "nothing (no validation split)",
        "ridge_val_top1": {f"{v:g}": a for v, a in val_of["ridge"].items()},
        "knn_val_top1": {str(v): a for v, a in val_of["knn"].items()},
    }
    result: dict[str, Any] = {
        "stage": "pixels", "step": 0, "metrics": metrics, "history": [], "protocol": protocol,
        "resumed_from": None, "world_size": env.world, "node": env.node,
        "device": str(env.device), "config": to_dict(cfg), "labels_file": "labels.txt"}
    w, b = ridge[lam]
    if not env.is_main:
        return result  # type: ignore[return-value]  # the main worker writes it
    return write_result(out, {"ridge": {"weight": w, "bias": b}}, result)
