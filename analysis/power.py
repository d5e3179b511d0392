"""Power of the findings' test, exactly: a two-sided one-sample t-test over n
independent replicates of a paired difference.

Under an effect delta with per-replicate spread sd, the statistic mean / (sd / sqrt n)
follows the noncentral t with n - 1 degrees of freedom and noncentrality
delta * sqrt(n) / sd. The normal-style shortcut (t_crit + t_power) * se understates
the detectable effect at small n (34.8 instead of 41.1 points at n = 3, where power at
the shortcut's effect is 0.69, not 0.80): everything here uses the noncentral t.

    detectable(se, n, level)          # the effect found with 80% power
    replicates_needed(sd, effect, level)
    spending(fractions, alpha)        # a group-sequential design's level per look
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

ALPHA, POWER = 0.05, 0.8


def power(effect: float, sd: float, n: int, level: float) -> float:
    """Power of the two-sided t-test at ``level`` over ``n`` replicates whose
    differences have mean ``effect`` and standard deviation ``sd``."""
    if n < 2 or not sd > 0:
        return float("nan")
    df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - level / 2, df)
    # The wrong-side tail is below level / 2 and shrinks with nc; scipy returns NaN
    # for it at large nc, where it is nil.
    lower = float(stats.nct.cdf(-crit, df, nc))
    return float(stats.nct.sf(crit, df, nc)) + (lower if np.isfinite(lower) else 0.0)


def detectable(se: float, n: int, level: float, target: float = POWER) -> float:
    """The smallest effect the test at ``level`` over ``n`` replicates finds with
    probability ``target``, when the mean's standard error is ``se`` (the spread
    behind it has n - 1 degrees of freedom)."""
    if n < 2 or not np.isfinite(se):
        return float("nan")
    if se == 0:
        return 0.0
    sd = se * math.sqrt(n)
    hi = se
    while power(hi, sd, n, level) < target:
        hi *= 2
    return float(optimize.brentq(lambda d: power(d, sd, n, level) - target, 0.0, hi,
                                 xtol=1e-9 * hi))


def replicates_needed(sd: float, effect: float, level: float, target: float = POWER,
                      most: int = 10_000) -> int | None:
    """The fewest independent replicates (at least 2) whose test at ``level`` finds
    ``effect`` with probability ``target`` given a per-replicate spread ``sd``; None
    when more than ``most`` would be needed."""
    if not sd > 0:
        return 2
    n = 2
    while power(effect, sd, n, level) < target:
        n = n + 1 if n < 64 else int(n * 1.1)
        if n > most:
            return None
    if n > 64:  # the coarse steps overshot: back off one at a time
        while n > 2 and power(effect, sd, n - 1, level) >= target:
            n -= 1
    return n


def obrien_fleming(fraction: float, alpha: float = ALPHA) -> float:
    """Lan-DeMets' O'Brien-Fleming-type spending function: the (two-sided) error
    spent by information ``fraction`` in (0, 1]."""
    if fraction <= 0:
        return 0.0
    z = stats.norm.ppf(1 - alpha / 2)
    return float(2 - 2 * stats.norm.cdf(z / math.sqrt(min(fraction, 1.0))))


def spending(fractions: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """The level of each look of a group-sequential design at information
    ``fractions`` (increasing, the last 1): the error the spending function adds
    since the look before. The looks' levels sum to ``alpha``, so by the union bound
    the chance of any false decision over every look is at most ``alpha`` whatever
    the looks' correlation (conservative: exact boundaries would spend a little more
    at each look)."""
    spent, out = 0.0, []
    for f in fractions:
        total = obrien_fleming(f, alpha)
        out.append(total - spent)
        spent = total
    return out


def sequential_plan(sd: float, effect: float, tests: int, first: int, batch: int,
                    alpha: float = ALPHA, target: float = POWER, most: int = 10_000
                    ) -> list[int] | None:
    """The looks (replicate counts) of the smallest sequential design that starts at
    ``first`` replicates, adds ``batch`` at each look, and whose final look alone,
    at its spent level over ``tests`` findings (Holm's strictest), has power
    ``target``: the design's power is at least that (a decision at an earlier look
    only adds). None when more than ``most`` replicates would be needed."""
    n = max(first, 2)
    while n <= most:
        looks = list(range(first, n, batch)) + [n] if n > first else [n]
        levels = spending([k / n for k in looks], alpha)
        if power(effect, sd, n, levels[-1] / tests) >= target:
            return looks
        n += batch
    return None


def holm_decisions(mean: np.ndarray, p: np.ndarray, level: float) -> np.ndarray:
    """Holm's step-down at ``level``: +1 / -1 for an effect decided above / below 0,
    0 for one not decided."""
    out = np.zeros(len(p), dtype=int)
    order = np.argsort(p, kind="stable")
    for rank, i in enumerate(order):
        if not p[i] * (len(p) - rank) < level:
            break
        out[i] = 1 if mean[i] > 0 else -1
    return out


def sequential_verdicts(values: np.ndarray, looks: Sequence[int], levels: Sequence[float]
                        ) -> tuple[np.ndarray, int]:
    """Run a group-sequential design on ``values`` (replicates x findings, in the order
    they were run): at look k, the two-sided t-test of every finding over the first
    looks[k] replicates, Holm-adjusted across the findings at the look's level
    levels[k]; the design stops at the first look that decides every finding. Returns
    (that look's verdicts, or the last look's: per finding +1 decided above 0, -1
    below, 0 not decided; the replicates used). Each look's family-wise error is at
    most its level, so over all looks at most their sum."""
    values = np.asarray(values, dtype=float)
    out = np.zeros(values.shape[1], dtype=int)
    for n, level in zip(looks, levels, strict=True):
        x = values[:n]
        mean, sd = x.mean(axis=0), x.std(axis=0, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = mean / (sd / math.sqrt(n))
        p = np.where(sd > 0, 2 * stats.t.sf(np.abs(t), n - 1), np.where(mean != 0, 0.0, 1.0))
        out = holm_decisions(mean, p, level)
        if (out != 0).all():
            return out, n
    return out, looks[-1]


def level_at(n: int, looks: Sequence[int], levels: Sequence[float]) -> float:
    """The level a sequential design tests ``n`` replicates at: its look's, or for a
    count between looks (an interrupted batch) the last look's before it (the
    first's below the first look)."""
    at = [lv for k, lv in zip(looks, levels, strict=True) if k <= n]
    return at[-1] if at else levels[0]
