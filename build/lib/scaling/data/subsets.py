"""Class-balanced labelled subsets, reproducible from a seed and saved as index files.

For one seed, each class's images are put in one fixed random order and a subset
takes the first k of every class: so the 1% subset is contained in the 10% one,
and results at different fractions differ only by the labels added.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from scaling.atomic import atomic_write_text


def label_subset(
    labels: np.ndarray,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sorted indices of a class-balanced subset.

    Exactly one of ``fraction`` (0 < f <= 1: round(f * n_c) images of class c,
    at least 1) or ``per_class`` (k images of every class, all where a class has
    fewer) must be given. Unlabelled entries (label < 0) are never chosen.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction or per_class")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"label fraction={fraction!r}; allowed: 0 < fraction <= 1")
    if per_class is not None and per_class < 1:
        raise ValueError(f"labels per_class={per_class!r}; allowed: >= 1")
    labels = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        if fraction is not None:
            k = max(1, math.floor(fraction * len(members) + 0.5))
        else:
            assert per_class is not None
            k = min(per_class, len(members))
        chosen.append(members[:k])
    if not chosen:
        raise ValueError("no labelled examples to choose from")
    return np.sort(np.concatenate(chosen))


def save_indices(path: str | os.PathLike[str], indices: np.ndarray) -> Path:
    """One index per line: readable, diffable, and no pickle involved."""
    return atomic_write_text(path, "".join(f"{int(i)}\n" for i in indices))


def load_indices(path: str | os.PathLike[str]) -> np.ndarray:
    text = Path(path).read_text().split()
    try:
        return np.array([int(t) for t in text], dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"{path}: not an index file (one integer per line): {e}") from None
