"""Label-efficiency curves: test error as a function of the number of labels, and
``analyse``, which fits a study's (a form chosen per model and stage, bootstrap
intervals over replicates, the labels each needs to reach the supervised baseline).

Pure functions on arrays; results are small frozen dataclasses. Every form is fitted
by nonlinear least squares on log(error) (errors span decades; relative misfit is
what matters), with bounds that keep it sane: exponents in [0, 3], floors in
[0, ceiling], where the ceiling is the random-guess error 1 - 1/K.

Forms (``FORMS``):
- ``power``: err = a n^-b
- ``saturating``: err = a n^-b + c (c: the error more labels cannot remove)
- ``envelope``: err = e0 u / sqrt(1 + u^2), u = a n^-b + c, e0 = 1 - 1/K: Rosenfeld
  et al. 2020's envelope with one variable; it starts at random guessing for few
  labels, bends into a power law, and saturates at e0 c / sqrt(1 + c^2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import brentq, least_squares

Curve = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
ArrayLike = Sequence[float] | np.ndarray


class FitError(ValueError):
    """Inputs no curve can be honestly fitted to; the message says why."""


@dataclass(frozen=True)
class Form:
    name: str
    params: tuple[str, ...]
    curve: Curve  # (n, theta, ceiling) -> error
    lower: tuple[float, ...]
    upper: Callable[[float], tuple[float, ...]]  # from the ceiling


def _power(n: np.ndarray, t: np.ndarray, ceiling: float) -> np.ndarray:
    return t[0] * n ** -t[1]


def _saturating(n: np.ndarray, t: np.ndarray, ceiling: float) -> np.ndarray:
    return t[0] * n ** -t[1] + t[2]


def _envelope(n: np.ndarray, t: np.ndarray, ceiling: float) -> np.ndarray:
    u = t[0] * n ** -t[1] + t[2]
    return ceiling * u / np.sqrt(1 + u * u)


FORMS: dict[str, Form] = {
    "power": Form("power", ("a", "b"), _power, (1e-12, 0.0), lambda c: (np.inf, 3.0)),
    "saturating": Form("saturating", ("a", "b", "c"), _saturating, (1e-12, 0.0, 0.0),
                       lambda c: (np.inf, 3.0, c)),
    "envelope": Form("envelope", ("a", "b", "c"), _envelope, (1e-12, 0.0, 0.0),
                     lambda c: (np.inf, 3.0, np.inf)),
}


@dataclass(frozen=True)
class Fit:
    form: str
    params: dict[str, float]
    ceiling: float
    rmse_log: float  # root mean square of log(predicted / observed) over the points
    points: int

    def predict(self, n: np.ndarray | float) -> np.ndarray:
        theta = np.array(list(self.params.values()))
        return FORMS[self.form].curve(np.asarray(n, dtype=float), theta, self.ceiling)

    def asymptote(self) -> float:
        """The error with unlimited labels."""
        p = self.params
        if self.form == "power":
            return 0.0
        if self.form == "saturating":
            return p["c"]
        return self.ceiling * p["c"] / float(np.sqrt(1 + p["c"] ** 2))

    def labels_for(self, error: float) -> float:
        """Labels the curve needs to reach ``error``; inf if it never does."""
        if error <= self.asymptote():
            return float("inf")
        lo, hi = 1e-3, 1e15
        f = lambda log_n: float(self.predict(np.exp(log_n))) - error  # noqa: E731
        if f(np.log(lo)) < 0:
            return lo
        if f(np.log(hi)) > 0:
            return float("inf")
        return float(np.exp(brentq(f, np.log(lo), np.log(hi), xtol=1e-10)))


def clean(n: ArrayLike, err: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Finite points with 0 < err <= 1 and n > 0, or FitError saying what is wrong."""
    n_arr, e_arr = np.asarray(n, dtype=float), np.asarray(err, dtype=float)
    if n_arr.shape != e_arr.shape:
        raise FitError(f"{n_arr.size} label counts but {e_arr.size} errors")
    keep = np.isfinite(n_arr) & np.isfinite(e_arr)
    if not keep.any():
        raise FitError(f"all {n_arr.size} points are NaN: no finished stage to fit")
    n_arr, e_arr = n_arr[keep], e_arr[keep]
    if (n_arr <= 0).any() or (e_arr <= 0).any() or (e_arr > 1).any():
        raise FitError("label counts must be > 0 and errors in (0, 1]; got "
                       f"n={n_arr.tolist()}, error={e_arr.tolist()}")
    return n_arr, e_arr


def fit(n: ArrayLike, err: ArrayLike, form: str = "saturating",
        ceiling: float = 1.0, start: Fit | None = None) -> Fit:
    """Least squares on log(error); several starts, the best one kept (or only
    ``start``'s parameters: the bootstrap refits from the central fit)."""
    if form not in FORMS:
        raise FitError(f"form={form!r}; allowed: {', '.join(FORMS)}")
    spec = FORMS[form]
    n_arr, e_arr = clean(n, err)
    distinct = np.unique(n_arr).size
    if distinct <= len(spec.params):  # as many points as parameters: an exact, empty fit
        raise FitError(f"{form} has {len(spec.params)} parameters but the data have "
                       f"{distinct} distinct label count(s); a fit needs more points than "
                       f"parameters (>= {len(spec.params) + 1})")
    if np.ptp(e_arr) == 0:
        raise FitError(f"the error is {e_arr[0]:g} at every label count: no curve to fit")
    upper = spec.upper(ceiling)
    # Starts: a power law through the points (log-log regression), several exponents.
    slope, icept = np.polyfit(np.log(n_arr), np.log(e_arr), 1)
    best = None
    exponents = [float(np.clip(-slope, 0.01, 2.9)), 0.1, 0.5, 1.0] if start is None else [0.0]
    for b0 in exponents:
        a0 = float(np.exp(icept)) if form == "power" else float(e_arr.max() * n_arr.min() ** b0)
        x0 = np.array([a0, b0] + ([min(e_arr.min() / 2, upper[2] / 2)]
                                  if len(spec.params) == 3 else []))
        if form == "envelope":  # u = err / sqrt(e0^2 - err^2) on the curve
            u = e_arr / np.sqrt(np.clip(ceiling**2 - e_arr**2, 1e-12, None))
            x0 = np.array([float(u.max() * n_arr.min() ** b0), b0, float(u.min() / 2)])
        if start is not None:
            x0 = np.array(list(start.params.values()))
        x0 = np.clip(x0, spec.lower, np.minimum(upper, 1e12))

        def resid(t: np.ndarray) -> np.ndarray:
            pred = spec.curve(n_arr, t, ceiling)
            return np.log(np.clip(pred, 1e-12, None)) - np.log(e_arr)

        sol = least_squares(resid, x0, bounds=(spec.lower, upper), method="trf",
                            x_scale="jac", max_nfev=4000)
        if best is None or sol.cost < best.cost:
            best = sol
    assert best is not None
    rmse = float(np.sqrt(np.mean(best.fun**2)))
    return Fit(form, dict(zip(spec.params, map(float, best.x), strict=True)), ceiling, rmse,
               int(n_arr.size))


@dataclass(frozen=True)
class Selection:
    best: str
    held_out: float  # the label count held out
    scores: dict[str, float]  # form -> |log(predicted / observed)| at the held-out count
    skipped: dict[str, str] = field(default_factory=dict)  # form -> why it was not scored


def select(n: ArrayLike, err: ArrayLike, ceiling: float = 1.0,
           forms: Sequence[str] = tuple(FORMS)) -> Selection:
    """Fit each form on all but the largest label count; the form that best predicts
    the held-out largest count (mean error there, in log space) wins."""
    n_arr, e_arr = clean(n, err)
    top = float(n_arr.max())
    train, test = n_arr < top, n_arr == top
    if not train.any():
        raise FitError("one label count only: nothing to extrapolate from")
    observed = float(np.log(e_arr[test].mean()))
    scores, skipped = {}, {}
    for form in forms:
        try:
            f = fit(n_arr[train], e_arr[train], form, ceiling)
        except FitError as e:
            skipped[form] = str(e)
            continue
        scores[form] = abs(float(np.log(f.predict(top))) - observed)
    if not scores:
        raise FitError("no form could be fitted below the largest label count: "
                       + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return Selection(min(scores, key=scores.__getitem__), top, scores, skipped)


@dataclass(frozen=True)
class Bootstrap:
    fit: Fit  # on the mean error per label count over all seeds
    intervals: dict[str, tuple[float, float]]  # parameter or derived quantity -> 95% interval
    resamples: int
    seeds: int
    samples: tuple[Fit, ...] = ()  # the resampled fits

    def band(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise 95% band of the fitted curve at label counts ``n``."""
        if not self.samples:
            curve = self.fit.predict(n)
            return curve, curve
        curves = np.stack([f.predict(n) for f in self.samples])
        return np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0)


def _percentile(values: list[float], q: float) -> float:
    """np.percentile, but a derived value that is inf in some resamples (an error
    never reached) gives inf, not the nan of interpolating between infinities."""
    v = np.asarray(values, dtype=float)
    return float(np.percentile(v, q, method="nearest" if np.isinf(v).any() else "linear"))


def bootstrap(n: ArrayLike, err: ArrayLike, seed: ArrayLike, form: str,
              ceiling: float = 1.0, derived: Mapping[str, Callable[[Fit], float]] | None = None,
              resamples: int = 300, rng: int = 0) -> Bootstrap:
    """95% percentile intervals over seeds: each resample draws seeds with
    replacement, averages their errors per label count, and refits. ``derived``
    maps names to functions of a Fit (e.g. labels to reach a target error)."""
    n_arr, e_arr = np.asarray(n, dtype=float), np.asarray(err, dtype=float)
    s_arr = np.asarray(seed)
    ok = np.isfinite(n_arr) & np.isfinite(e_arr)
    n_arr, e_arr, s_arr = n_arr[ok], e_arr[ok], s_arr[ok]
    seeds = np.unique(s_arr)
    if seeds.size < 2:
        raise FitError(f"{seeds.size} seed(s): a bootstrap over seeds needs >= 2 "
                       "(run the study with --repeats 2 or more)")
    derived = derived or {}

    def mean_curve(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [(n_arr[s_arr == s], e_arr[s_arr == s]) for s in chosen]
        ns, es = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        xs = np.unique(ns)
        return xs, np.array([es[ns == x].mean() for x in xs])

    central = fit(*mean_curve(seeds), form, ceiling)
    draws = np.random.default_rng(rng)
    values: dict[str, list[float]] = {k: [] for k in [*central.params, *derived]}
    samples: list[Fit] = []
    for _ in range(resamples):
        try:
            f = fit(*mean_curve(draws.choice(seeds, seeds.size, replace=True)), form, ceiling,
                    start=central)
        except FitError:
            continue  # e.g. a resample whose errors are all equal
        samples.append(f)
        for k, v in f.params.items():
            values[k].append(v)
        for k, fn in derived.items():
            values[k].append(fn(f))
    intervals = {k: (_percentile(v, 2.5), _percentile(v, 97.5)) for k, v in values.items() if v}
    return Bootstrap(central, intervals, resamples, int(seeds.size), tuple(samples))


def curve(f: Fit | Bootstrap) -> Fit:
    """The central fit, whether or not it came with a bootstrap."""
    return f.fit if isinstance(f, Bootstrap) else f


def efficiency(finetuned: Fit, supervised: Fit, error: float) -> float:
    """How many times fewer labels fine-tuning needs than supervised training to
    reach ``error`` (the label-efficiency multiplier); inf / nan where unreachable."""
    ft, sup = finetuned.labels_for(error), supervised.labels_for(error)
    if np.isinf(ft):
        return float("nan")
    return sup / ft


@dataclass(frozen=True)
class JointFit:
    """err(n, P) = a n^-b + d P^-e + c over label counts n and parameters P."""
    params: dict[str, float]
    rmse_log: float
    points: int

    def predict(self, n: np.ndarray | float, p: np.ndarray | float) -> np.ndarray:
        q = self.params
        return (q["a"] * np.asarray(n, float) ** -q["b"]
                + q["d"] * np.asarray(p, float) ** -q["e"] + q["c"])


def fit_joint(n: ArrayLike, params: ArrayLike, err: ArrayLike,
              ceiling: float = 1.0) -> JointFit:
    n_arr, e_arr = clean(n, err)
    p_arr = np.asarray(params, dtype=float)[np.isfinite(np.asarray(n, float))
                                            & np.isfinite(np.asarray(err, float))]
    # Each power law with its share of the floor needs more than 2 values along its
    # axis, and the whole surface more points than its 5 parameters.
    points = len({(a, b) for a, b in zip(n_arr.tolist(), p_arr.tolist(), strict=True)})
    if np.unique(n_arr).size < 3 or np.unique(p_arr).size < 3 or points <= 5:
        raise FitError("a joint fit (5 parameters) needs >= 3 label counts, >= 3 model sizes "
                       f"and more than 5 (labels, size) points; got {np.unique(n_arr).size}, "
                       f"{np.unique(p_arr).size} and {points}")

    def resid(t: np.ndarray) -> np.ndarray:
        pred = t[0] * n_arr ** -t[1] + t[2] * p_arr ** -t[3] + t[4]
        return np.log(np.clip(pred, 1e-12, None)) - np.log(e_arr)

    start = [e_arr.max() * n_arr.min() ** 0.3, 0.3, e_arr.max() * p_arr.min() ** 0.3, 0.3,
             min(e_arr.min() / 2, ceiling / 2)]
    sol = least_squares(resid, start, bounds=([1e-12, 0, 1e-12, 0, 0],
                                              [np.inf, 3, np.inf, 3, ceiling]),
                        x_scale="jac", max_nfev=8000)
    names = ("a", "b", "d", "e", "c")
    return JointFit(dict(zip(names, map(float, sol.x), strict=True)),
                    float(np.sqrt(np.mean(sol.fun**2))), int(n_arr.size))


def mean_interval(values: ArrayLike) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval over independent replicates (df = n - 1):
    mean +- t(0.975, n-1) s / sqrt(n). A nan interval with one value, a zero-width one
    where every value is equal. With 2 values t is 12.7: wide, as 2 replicates are.

    Not a bootstrap: issue 28 simulated BCa on 4 values covering 81% at a nominal 95%;
    this interval's coverage is simulated in tests/test_analysis.py (0.93-0.95 for
    normal and moderately skewed effects at n = 2, 3, 4, 6)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan"), float("nan")
    mean = float(v.mean())
    half = float(t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


GRID = 200  # label counts the fitted curves are drawn at


REACH = "labels to reach the supervised baseline's best accuracy"


@dataclass
class Analysis:
    """Curves per (model, stage), derived answers, and why anything was skipped."""
    fits: dict[tuple[str, str], Fit | Bootstrap] = field(default_factory=dict)
    chosen: dict[tuple[str, str], str] = field(default_factory=dict)  # form and how
    derived: list[dict[str, object]] = field(default_factory=list)
    joint: str = ""
    notes: list[str] = field(default_factory=list)


def ceiling_of(df: pd.DataFrame) -> float:
    """The random-guess error 1 - 1/classes of a tidy table (1 where classes are unknown):
    the bound every curve and law of its errors is fitted under."""
    classes = df["classes"].dropna()
    return float(1 - 1 / classes.iloc[0]) if len(classes) else 1.0


def _baseline(df: pd.DataFrame, model: str) -> float | None:
    """The supervised baseline's top-1 with the most labels (mean over seeds)."""
    sup = df[(df["model"] == model) & (df["stage"] == "supervised") & df["top1"].notna()]
    if sup.empty:
        return None
    return float(sup.loc[sup["labels"] == sup["labels"].max(), "top1"].mean())


def analyse(df: pd.DataFrame) -> Analysis:
    out = Analysis()
    rows = df[df["stage"].isin(["finetune", "supervised"]) & df["labels"].notna()
              & df["error"].notna()]
    ceiling = ceiling_of(df)
    # In the tidy table's order (by size): fit tables and legends list 1/16x before 1/4x.
    for (model, stage), g in rows.groupby(["model", "stage"], sort=False):
        n, err, seeds = g["labels"].to_numpy(), g["error"].to_numpy(), g["replicate"].to_numpy()
        if np.unique(n).size < 3:
            form, how = "power", (f"power law: {np.unique(n).size} label counts are too few "
                                  "to choose a form by extrapolation (needs >= 3)")
        else:
            try:
                sel = select(n, err, ceiling)
                form, how = sel.best, (f"best at predicting {sel.held_out:g} labels from "
                                       "fewer (|log error| there): "
                                       + ", ".join(f"{k} {v:.3f}" for k, v in sel.scores.items()))
            except FitError as e:
                form, how = "power", f"power law (no selection: {e})"
        try:
            point = fit(n, err, form, ceiling)
        except FitError as e:
            out.notes.append(f"{model} {stage}: no curve: {e}")
            continue
        out.chosen[(model, stage)] = f"{form}; {how}"
        acc = _baseline(df, str(model))
        derived: dict[str, Callable[[Fit], float]] = {}
        if acc is not None:
            derived[REACH] = lambda f, t=1 - acc: f.labels_for(t)  # type: ignore[misc]
        try:
            out.fits[(model, stage)] = bootstrap(n, err, seeds, form, ceiling, derived)
        except FitError as e:
            out.fits[(model, stage)] = point
            out.notes.append(f"{model} {stage}: no intervals: {e}")
    for model in rows["model"].unique():
        ft, sup = out.fits.get((model, "finetune")), out.fits.get((model, "supervised"))
        acc = _baseline(df, str(model))
        if ft is None or sup is None or acc is None:
            continue
        ft_fit, sup_fit = curve(ft), curve(sup)
        need = (ft_fit.labels_for(1 - acc), sup_fit.labels_for(1 - acc))
        measured = rows.loc[rows["model"] == model, "labels"]
        lo, hi = float(measured.min()), float(measured.max())
        ends = ft.intervals.get(REACH, (np.nan, np.nan)) if isinstance(ft, Bootstrap) else (
            np.nan, np.nan)
        inside = all(lo <= x <= hi for x in need)
        # The interval too: a point inside with an interval reaching far beyond is
        # not a measured-range answer.
        interval_inside = all(not np.isfinite(e) or lo <= e <= hi for e in ends) and not any(
            np.isinf(e) for e in ends)
        out.derived.append({
            "model": model, "target top-1 (supervised, most labels)": round(100 * acc, 2),
            "labels, fine-tuned": need[0], "labels, supervised": need[1],
            "label-efficiency multiplier": efficiency(ft_fit, sup_fit, 1 - acc),
            "95% interval, fine-tuned labels": _interval(ft, REACH),
            "within measured labels": ("yes" if inside and interval_inside else
                                       f"the estimate, not its interval (measured "
                                       f"{lo:,.0f}..{hi:,.0f})" if inside else
                                       f"no: extrapolated beyond {lo:,.0f}..{hi:,.0f}")})
    ft_rows = rows[rows["stage"] == "finetune"]
    try:
        j = fit_joint(ft_rows["labels"], ft_rows["params"], ft_rows["error"], ceiling)
        out.joint = ("error(n, P) = {a:.3g} n^-{b:.3f} + {d:.3g} P^-{e:.3f} + {c:.4f}"
                     .format(**j.params) + f" (rmse of log error {j.rmse_log:.3f}, "
                     f"{j.points} points)")
    except FitError as e:
        out.joint = f"not fitted: {e}"
    return out


def _count(x: float) -> str:
    """A label count read off a curve, whole ('2,972'); 'not reached' where the curve
    never reaches the target."""
    return "not reached" if np.isinf(x) else f"{x:,.0f}"


def number(x: float) -> str:
    """Any other fitted number: 4 significant digits, never in e-notation at the sizes
    these tables hold ('0.3512', '12.35', '33,390')."""
    if np.isinf(x):
        return "not reached"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _interval(f: Fit | Bootstrap, name: str) -> str:
    if isinstance(f, Bootstrap) and name in f.intervals:
        lo, hi = f.intervals[name]
        fmt = _count if name == REACH else number
        return f"[{fmt(lo)}, {fmt(hi)}]"
    return "n/a (one seed)"
