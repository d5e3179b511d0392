"""Replicates, and the stage runs they share.

An interval over replicates claims that they are independent draws. A study's
``replicate`` axis makes them so (each its own pretraining seed, labelled subset and
fine-tuning seed: no stage run in common). Other designs share runs: crossing 2
pretraining seeds with 2 labelled subsets gives 4 cells but only 2 pretraining runs,
and every model's cells share one pixel-arm run per subset. Values that share a run
are not independent, so an effect's values are first grouped into clusters, the
connected components of "shares a stage run", each cluster counts once (its mean),
and the Student-t interval is taken over the clusters.

Sharing is wider than a stage run: two rows of one replicate that share its labelled
subset (or its seed) but no run, say two head settings fine-tuned on the same labels,
carry the same draw of the subset, and a subset that is easy for one is easy for
the other. Counting them apart shrank a simulated interval's coverage to 0.89 where
half the variance came from the subset (tests/test_findings.py). So every row's
``runs`` holds its stage keys (its own and its input stages', from the same cell)
and its draws: ``seed:N`` and ``subset:N``. An effect that combines rows unites
their runs (``links``). A crossed design (seeds x subsets) is then one cluster: it
has no independent replicates, and says so (no interval).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from analysis.curves import mean_interval
from scaling.stages.registry import with_inputs


def row_runs(df: pd.DataFrame) -> pd.Series:
    """Per row: the frozenset of stage keys it rests on, its own and its inputs' (the
    rows of the same cell with an input stage), and its draws (seed, labelled subset)."""
    by_cell: dict[str, dict[str, str]] = {}
    for cell, stage, key in zip(df["cell"], df["stage"], df["stage_key"], strict=True):
        by_cell.setdefault(cell, {})[stage] = key
    out = []
    for cell, stage, seed, subset in zip(df["cell"], df["stage"], df["seed"], df["subset_seed"],
                                         strict=True):
        keys = by_cell[cell]
        out.append(frozenset([*(keys[s] for s in with_inputs([stage]) if s in keys),
                              f"seed:{seed}", f"subset:{subset}"]))
    return pd.Series(out, index=df.index, dtype=object)


def links(df: pd.DataFrame, rows: pd.DataFrame, stages: Iterable[str]) -> pd.Series:
    """Per row of ``rows`` (a subset of ``df``): the runs of its own cell's rows of
    ``stages`` united, i.e. what an effect comparing those stages in a cell rests on."""
    stages = set(stages)
    of: dict[str, frozenset[str]] = {}
    for cell, stage, runs in zip(df["cell"], df["stage"], df["runs"], strict=True):
        if stage in stages:
            of[cell] = of.get(cell, frozenset()) | runs
    return pd.Series([of.get(c, frozenset()) for c in rows["cell"]], index=rows.index,
                     dtype=object)


def clusters(shared: Sequence[frozenset[str]]) -> np.ndarray:
    """A cluster number per value: values whose run sets overlap, directly or through
    others, are one cluster (union-find over the run keys)."""
    parent = list(range(len(shared)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, runs in enumerate(shared):
        for key in runs:
            if key in first:
                parent[root(i)] = root(first[key])
            else:
                first[key] = i
    roots = [root(i) for i in range(len(shared))]
    _, labels = np.unique(roots, return_inverse=True)
    return np.asarray(labels)


def cluster_means(values: ArrayLike, shared: Sequence[frozenset[str]]) -> np.ndarray:
    """One value per cluster of ``shared`` (its mean); NaN values are left out."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    if not ok.any():
        return np.array([])
    labels = clusters([s for s, keep in zip(shared, ok, strict=True) if keep])
    return np.asarray(pd.Series(v[ok]).groupby(labels).mean().to_numpy())


def effect(values: ArrayLike, shared: Sequence[frozenset[str]]) -> tuple[float, float, float, int]:
    """(mean, low, high, independent replicates): the Student-t 95% interval over the
    clusters of values that share no stage run."""
    means = cluster_means(values, shared)
    if len(means) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean, lo, hi = mean_interval(means)
    return mean, lo, hi, len(means)
