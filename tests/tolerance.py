"""Comparisons at a tensor's own scale.

Two runs that sum in a different order (2 workers vs 1, AVX2 vs AVX-512, a GPU,
a fused vs a looped optimiser) differ by a few ulps *of the largest terms they
summed*, not of each element: an element near zero in a tensor whose largest
value is 3.7 can be off by 1e-6 and still be right. So the tolerance is scaled
to the tensor: max|a - b| <= rel * max|b|.
"""

from __future__ import annotations

import torch


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5,
                          name: str = "", scale: float | None = None) -> None:
    """Assert max|actual - expected| <= rel * max|expected| (same shape, any dtype).

    ``scale`` replaces max|expected| where the exact answer is ~0 (a conv bias
    before BN has no gradient): then the scale is that of the sums it came from.
    """
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if scale is None:
        scale = float(b.abs().max()) if b.numel() else 0.0
    worst = float((a - b).abs().max()) if b.numel() else 0.0
    assert worst <= rel * scale, (
        f"{name}: max|a-b| = {worst:.3g} > {rel:g} x max|b| = {rel * scale:.3g}")
