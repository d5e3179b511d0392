"""Scaling laws over label counts and model size, judged by how well they predict a
model they were not fitted on.

A law maps (labels n, encoder parameters P in millions) to the fine-tuned test error.
Depth, width and SK enter through P; a law may add an architecture term, a factor
exp(s * sk + t * ln(depth / smallest depth)) on the error, which has to earn its place
out of sample like everything else. Forms (``FORMS``):

- ``additive``: err = a n^-b + d P^-g + c (analysis.curves.fit_joint's law)
- ``interaction``: err = (a n^-b + c) P^-g: size scales the whole label curve, so a
  bigger model saves more points where the error is large (few labels)
- ``power``, ``saturating``, ``envelope``: analysis.curves' forms along P, one curve
  per label count (no sharing across label counts; they predict measured counts only)

Every law is fitted by least squares on log(error) to the mean error per (model,
label count). ``loo`` holds each model out in turn and predicts it from the others;
``choose`` picks the form (then the architecture terms) with the smallest mean
|predicted - measured| top-1 over the held-out models: in-sample fit never chooses.
``held_out`` repeats the whole procedure (choice included) without each model in
turn. ``predict`` adds a 95% prediction interval: the law's out-of-sample residual spread
plus, where the data have independent replicates, the spread of refits over
resampled replicates (analysis.replicates' clusters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import least_squares

from analysis.curves import FitError

ALONG_P = ("power", "saturating", "envelope")
FORMS = ("additive", "interaction", *ALONG_P)
TERMS = ("sk", "depth")
# Distinct model sizes a form needs to be fitted (along P: its parameters per label
# count; a power law through 2 sizes is a line in log-log, determined but not checked).
MIN_SIZES = {"additive": 3, "interaction": 2, "power": 2, "saturating": 4, "envelope": 4}
FORMULA = {"additive": "a n^-b + d P^-g + c", "interaction": "(a n^-b + c) P^-g",
           "power": "a_n P^-b_n", "saturating": "a_n P^-b_n + c_n",
           "envelope": "e0 u / sqrt(1 + u^2), u = a_n P^-b_n + c_n"}
COLUMNS = ["model", "params_m", "depth", "sk", "labels", "error"]


def points(df: pd.DataFrame, stage: str = "finetune") -> pd.DataFrame:
    """Mean test error per (model, label count) of ``stage`` from a tidy table
    (analysis.collect.tidy): COLUMNS plus ``replicates``, the number averaged."""
    rows = _one_setting(df[(df["stage"] == stage) & df["error"].notna() & df["labels"].notna()])
    if rows.empty:
        raise FitError(f"no {stage} rows with a test error: no law to fit")
    out = (rows.assign(params_m=rows["params"] / 1e6)
           .groupby(["model", "params_m", "depth", "sk", "labels"], as_index=False, sort=False)
           .agg(error=("error", "mean"), replicates=("error", "size")))
    return out.sort_values(["params_m", "labels"], ignore_index=True)


def _one_setting(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of one projection-head setting (depth, layer fine-tuned from): a law
    is over labels and size, so a study that also varies the head is read at the
    setting most of its models have (the first such in sorted order)."""
    if rows.empty or rows.groupby(["head_depth", "ft_layer"]).ngroups == 1:
        return rows
    models = rows.groupby(["head_depth", "ft_layer"])["model"].nunique()
    hd, layer = models[models == models.max()].index[0]
    return rows[(rows["head_depth"] == hd) & (rows["ft_layer"] == layer)]


def replicate_points(df: pd.DataFrame, stage: str = "finetune") -> pd.DataFrame | None:
    """Per (model, label count, independent replicate): the error, for resampling;
    None with one replicate (nothing to resample). ``cluster`` numbers the replicates
    that share no run or draw (analysis.replicates): a resample draws whole clusters,
    every model's rows of one together."""
    from analysis import replicates

    if df["replicate"].nunique() < 2:
        return None
    rows = _one_setting(df[(df["stage"] == stage) & df["error"].notna() & df["labels"].notna()])
    rows = rows.assign(params_m=rows["params"] / 1e6,
                       cluster=replicates.clusters(list(rows["runs"])))
    return rows[[*COLUMNS, "cluster"]].reset_index(drop=True)


@dataclass(frozen=True)
class LawFit:
    form: str
    terms: tuple[str, ...]
    theta: tuple[float, ...]
    names: tuple[str, ...]
    labels: tuple[float, ...]  # the label counts an along-P form has a curve for
    depth_ref: float
    ceiling: float
    rmse_log: float  # in-sample: the appendix's number, never a choice's

    @property
    def params(self) -> dict[str, float]:
        return dict(zip(self.names, self.theta, strict=True))

    def predict(self, pts: pd.DataFrame) -> np.ndarray:
        """Error at each row of ``pts`` (columns params_m, labels, depth, sk)."""
        return _curve(self.form, self.terms, np.asarray(self.theta), self.labels,
                      self.depth_ref, self.ceiling, Inputs.of(pts))

    def describe(self) -> str:
        terms = "".join(f" x exp({'s*sk' if t == 'sk' else 't*ln(depth/d0)'})"
                        for t in self.terms)
        return f"{self.form}: err = {FORMULA[self.form]}{terms}"


class Inputs(NamedTuple):
    """A law's variables as arrays (read once from the table: a fit calls the curve
    hundreds of times)."""
    n: np.ndarray  # labels
    p: np.ndarray  # parameters, millions
    depth: np.ndarray
    sk: np.ndarray  # 1 where selective kernels

    @classmethod
    def of(cls, pts: pd.DataFrame) -> Inputs:
        return cls(pts["labels"].to_numpy(float), pts["params_m"].to_numpy(float),
                   pts["depth"].to_numpy(float), (pts["sk"].to_numpy(float) > 0) * 1.0)


def _arch(terms: Sequence[str], theta: np.ndarray, depth_ref: float, x: Inputs) -> np.ndarray:
    out = np.zeros(len(x.n))
    for t, v in zip(terms, theta, strict=True):
        out += v * (x.sk if t == "sk" else np.log(x.depth / depth_ref))
    return np.exp(out)


def _at(x: Inputs, labels: Sequence[float]) -> list[np.ndarray]:
    """Which rows are at each label count (found once per fit, not per evaluation)."""
    return [np.isclose(x.n, lab, rtol=1e-9) for lab in labels]


def _curve(form: str, terms: Sequence[str], theta: np.ndarray, labels: Sequence[float],
           depth_ref: float, ceiling: float, x: Inputs,
           masks: list[np.ndarray] | None = None) -> np.ndarray:
    n, p = x.n, x.p
    k = len(theta) - len(terms)
    core, extra = theta[:k], theta[k:]
    if form == "additive":
        a, b, d, g, c = core
        err = a * n ** -b + d * p ** -g + c
    elif form == "interaction":
        a, b, c, g = core
        err = (a * n ** -b + c) * p ** -g
    else:
        per = 2 if form == "power" else 3
        err = np.full(len(n), np.nan)
        for i, at in enumerate(masks if masks is not None else _at(x, labels)):
            t = core[per * i: per * (i + 1)]
            u = t[0] * p[at] ** -t[1] + (t[2] if per == 3 else 0.0)
            err[at] = ceiling * u / np.sqrt(1 + u * u) if form == "envelope" else u
        if np.isnan(err).any():
            missing = sorted(set(n[np.isnan(err)].tolist()))
            raise FitError(f"{form} has a curve per measured label count; {missing} was "
                           "not measured")
    return err * _arch(terms, extra, depth_ref, x)


def _jacobian(form: str, terms: Sequence[str], theta: np.ndarray, labels: Sequence[float],
              depth_ref: float, ceiling: float, x: Inputs, masks: list[np.ndarray]
              ) -> np.ndarray:
    """d log(error) / d theta, one row per point: the fit's Jacobian in closed form
    (finite differences cost a curve evaluation per parameter and step;
    tests/test_laws.py checks this against them)."""
    n, p = x.n, x.p
    k = len(theta) - len(terms)
    core = theta[:k]
    jac = np.zeros((len(n), len(theta)))
    if form == "additive":
        a, b, d, g, c = core
        nb, pg = n ** -b, p ** -g
        err = a * nb + d * pg + c
        jac[:, :k] = np.column_stack([nb, -a * nb * np.log(n), pg, -d * pg * np.log(p),
                                      np.ones(len(n))]) / err[:, None]
    elif form == "interaction":
        a, b, c, g = core
        nb = n ** -b
        level = a * nb + c
        jac[:, :k] = np.column_stack([nb / level, -a * nb * np.log(n) / level, 1 / level,
                                      -np.log(p)])
    else:
        per = 2 if form == "power" else 3
        for i, at in enumerate(masks):
            t = core[per * i: per * (i + 1)]
            pb = p[at] ** -t[1]
            u = t[0] * pb + (t[2] if per == 3 else 0.0)
            du = [pb, -t[0] * pb * np.log(p[at])] + ([np.ones(at.sum())] if per == 3 else [])
            # log of the envelope e0 u / sqrt(1 + u^2): d/du = 1/u - u/(1 + u^2)
            scale = 1 / u - (u / (1 + u * u) if form == "envelope" else 0.0)
            for j, dj in enumerate(du):
                jac[at, per * i + j] = dj * scale
    for j, term in enumerate(terms):
        jac[:, k + j] = x.sk if term == "sk" else np.log(x.depth / depth_ref)
    return jac


def _varies(pts: pd.DataFrame, term: str) -> bool:
    col = (pts["sk"] > 0) if term == "sk" else pts["depth"]
    return bool(col.nunique() > 1)


def _starts(form: str, pts: pd.DataFrame, labels: Sequence[float], ceiling: float
            ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Starting points and bounds of the form's own parameters."""
    n, p, e = (pts[c].to_numpy(float) for c in ("labels", "params_m", "error"))
    if form == "additive":
        joint = [np.array([e.max() * n.min() ** b, b, e.max() * p.min() ** b, b,
                           min(e.min() / 2, ceiling / 2)]) for b in (0.3, 0.6)]
        return joint, np.array([1e-12, 0, 1e-12, 0, 0]), np.array([np.inf, 3, np.inf, 3, ceiling])
    if form == "interaction":
        scaled = [np.array([e.max() * n.min() ** b, b, e.min() / 2, g])
                  for b in (0.3, 0.6) for g in (0.05, 0.2)]
        return scaled, np.array([1e-12, 0, 0, 0]), np.array([np.inf, 3, ceiling, 3])
    per = 2 if form == "power" else 3
    starts: list[np.ndarray] = []
    lower: list[float] = []
    upper: list[float] = []
    for b in (0.1, 0.3):
        x: list[float] = []
        for lab in labels:
            at = np.isclose(n, lab)
            x += [float(e[at].max() * p[at].min() ** b), b]
            if per == 3:
                x.append(float(e[at].min() / 2))
        starts.append(np.array(x))
    for _ in labels:
        lower += [1e-12, 0.0] + ([0.0] if per == 3 else [])
        upper += [np.inf, 3.0] + ([ceiling if form == "saturating" else np.inf]
                                  if per == 3 else [])
    return starts, np.array(lower), np.array(upper)


def fit(pts: pd.DataFrame, form: str, terms: Sequence[str] = (), ceiling: float = 1.0,
        start: LawFit | None = None) -> LawFit:
    """Least squares on log(error) of ``form`` (with architecture ``terms``) to
    ``pts`` (points()' columns); FitError where the data cannot determine it."""
    if form not in FORMS:
        raise FitError(f"form={form!r}; allowed: {', '.join(FORMS)}")
    sizes = pts["params_m"].nunique()
    if sizes < MIN_SIZES[form]:
        raise FitError(f"{form} needs >= {MIN_SIZES[form]} model sizes; the data have {sizes}")
    labels = tuple(sorted(pts["labels"].unique().tolist()))
    if form in ("additive", "interaction") and len(labels) < (3 if form == "additive" else 2):
        raise FitError(f"{form} needs >= {3 if form == 'additive' else 2} label counts; "
                       f"the data have {len(labels)}")
    for t in terms:
        if t not in TERMS:
            raise FitError(f"term={t!r}; allowed: {', '.join(TERMS)}")
        if not _varies(pts, t):
            raise FitError(f"a {t} term needs models that differ in {t}")
    if form in ALONG_P:
        few = pts.groupby("labels")["params_m"].nunique().min()
        if few < MIN_SIZES[form]:
            raise FitError(f"{form} needs >= {MIN_SIZES[form]} sizes at every label count; "
                           f"one has {few}")
    e = pts["error"].to_numpy(float)
    if (e <= 0).any() or (e > 1).any():
        raise FitError(f"errors must be in (0, 1]; got {e.tolist()}")
    starts, lower, upper = _starts(form, pts, labels, ceiling)
    k = len(lower)
    lower = np.concatenate([lower, np.full(len(terms), -5.0)])
    upper = np.concatenate([upper, np.full(len(terms), 5.0)])
    if start is not None:
        starts = [np.asarray(start.theta)]
    depth_ref = float(pts["depth"].min())
    x = Inputs.of(pts)
    masks = _at(x, labels)

    def resid(t: np.ndarray) -> np.ndarray:
        pred = _curve(form, terms, t, labels, depth_ref, ceiling, x, masks)
        return np.log(np.clip(pred, 1e-12, None)) - np.log(e)

    def jac(t: np.ndarray) -> np.ndarray:
        return _jacobian(form, terms, t, labels, depth_ref, ceiling, x, masks)

    best = None
    for x0 in starts:
        if len(x0) == k:
            x0 = np.concatenate([x0, np.zeros(len(terms))])
        x0 = np.clip(x0, lower, np.minimum(upper, 1e12))
        sol = least_squares(resid, x0, jac=jac, bounds=(lower, upper), x_scale="jac",
                            max_nfev=4000)
        if best is None or sol.cost < best.cost:
            best = sol
    assert best is not None
    names = _names(form, labels) + tuple(terms)
    return LawFit(form, tuple(terms), tuple(map(float, best.x)), names, labels, depth_ref,
                  ceiling, float(np.sqrt(np.mean(best.fun ** 2))))


def _names(form: str, labels: Sequence[float]) -> tuple[str, ...]:
    if form == "additive":
        return ("a", "b", "d", "g", "c")
    if form == "interaction":
        return ("a", "b", "c", "g")
    each = ("a", "b") if form == "power" else ("a", "b", "c")
    return tuple(f"{x}@{lab:g}" for lab in labels for x in each)


def loo(pts: pd.DataFrame, form: str, terms: Sequence[str] = (), ceiling: float = 1.0
        ) -> pd.DataFrame:
    """Leave one model out: fit on the others, predict the held-out model at its label
    counts. One row per held-out point: predicted and measured top-1 (%), and
    ``miss`` = predicted - measured (points). FitError if any model cannot be."""
    out = []
    for model, held in pts.groupby("model", sort=False):
        law = fit(pts[pts["model"] != model], form, terms, ceiling)
        pred = 100 * (1 - law.predict(held))
        out.append(held.assign(predicted=pred, measured=100 * (1 - held["error"]),
                               miss=pred - 100 * (1 - held["error"])))
    return pd.concat(out, ignore_index=True)


def name_of(form: str, terms: Sequence[str]) -> str:
    return form + "".join(f" +{t}" for t in terms)


@dataclass(frozen=True)
class Choice:
    """The form (and architecture terms) with the smallest out-of-sample error."""
    form: str
    terms: tuple[str, ...]
    scores: dict[str, float]  # candidate -> mean |miss| over held-out points (points)
    residuals: pd.DataFrame  # the chosen candidate's loo() rows
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why not scored
    # candidate -> its (form, terms): what each scored name stands for
    candidates: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return name_of(self.form, self.terms)


def choose(pts: pd.DataFrame, ceiling: float = 1.0, forms: Sequence[str] = FORMS) -> Choice:
    """The form with the smallest mean |loo miss|; then each architecture term that
    varies is added to it if it lowers that error (and both, if both do). Stepwise:
    a form that would only win with a term is not found (trying every form with
    every term triples the fits, and held_out repeats this per model)."""
    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    kept: dict[str, pd.DataFrame] = {}
    candidates: dict[str, tuple[str, tuple[str, ...]]] = {}

    def score(form: str, terms: tuple[str, ...]) -> None:
        name = name_of(form, terms)
        candidates[name] = (form, terms)
        try:
            r = loo(pts, form, terms, ceiling)
        except FitError as e:
            skipped[name] = str(e)
            return
        scores[name], kept[name] = float(r["miss"].abs().mean()), r

    for form in forms:
        score(form, ())
    if not scores:
        raise FitError("no law could be checked out of sample: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()))
    best = min(scores, key=scores.__getitem__)
    form, terms = best, tuple[str, ...]()
    helpful = []
    for t in TERMS:
        if _varies(pts, t):
            score(form, (t,))
            if name_of(form, (t,)) in scores and scores[name_of(form, (t,))] < scores[best]:
                helpful.append(t)
    if len(helpful) == 2:
        score(form, tuple(helpful))
    for name, (base, with_terms) in candidates.items():
        if base == form and name in scores and scores[name] < scores[name_of(form, terms)]:
            terms = with_terms
    return Choice(form, terms, scores, kept[name_of(form, terms)], skipped,
                  {k: v for k, v in candidates.items() if k in scores})


@dataclass(frozen=True)
class Prediction:
    table: pd.DataFrame  # per label count: predicted top-1 (%), low, high (+ measured)
    choice: Choice
    law: LawFit
    residual_sd: float  # RMS of the chosen law's held-out misses (points)
    df: int  # held-out points - 1: the t quantile's degrees of freedom
    resampled: int  # replicate resamples behind the fit's own spread (0: none)


def predict(pts: pd.DataFrame, new: pd.DataFrame, ceiling: float = 1.0,
            reps: pd.DataFrame | None = None, resamples: int = 200, rng: int = 0,
            forms: Sequence[str] = FORMS, choice: Choice | None = None) -> Prediction:
    """Top-1 of the models in ``new`` (columns model, params_m, depth, sk, labels)
    from the law choose() picks on ``pts``, with a 95% prediction interval:
    prediction +- t(0.975, m - 1) sqrt(s^2 + v), s the RMS of the chosen law's m
    held-out misses, v the variance of the prediction over refits to resampled
    independent replicates (``reps``: replicate_points(); none: v = 0). ``choice``:
    a law already chosen (and its held-out misses), instead of choosing on ``pts``.

    m - 1 degrees of freedom, not (held-out models - 1): simulated 3-size studies
    covered 0.89-0.97 with it, and 0.99-1.00 (intervals ~1.9x too wide) with the
    models' count (tests/test_laws.py keeps the coverage checked)."""
    choice = choice or choose(pts, ceiling, forms)
    law = fit(pts, choice.form, choice.terms, ceiling)
    centre = 100 * (1 - law.predict(new))
    s = float(np.sqrt(np.mean(choice.residuals["miss"] ** 2)))
    var = np.zeros(len(new))
    drawn = 0
    if reps is not None and reps["cluster"].nunique() >= 2:
        draws = np.random.default_rng(rng)
        # Split once, drawn from many times.
        by: dict[Any, pd.DataFrame] = dict(list(reps.groupby("cluster")))
        ids = np.array(sorted(by))
        preds = []
        for _ in range(resamples):
            pick = draws.choice(ids, ids.size, replace=True)
            sample = pd.concat([by[i] for i in pick])
            mean = pd.DataFrame(sample.groupby(COLUMNS[:-1], as_index=False, sort=False)[
                "error"].mean())
            try:
                refit = fit(mean, choice.form, choice.terms, ceiling, start=law)
            except FitError:
                continue
            preds.append(100 * (1 - refit.predict(new)))
        if len(preds) >= 2:
            var, drawn = np.var(np.stack(preds), axis=0, ddof=1), len(preds)
    df = max(len(choice.residuals) - 1, 1)
    half = stats.t.ppf(0.975, df) * np.sqrt(s ** 2 + var)
    table = new.assign(predicted=centre, low=centre - half, high=centre + half)
    return Prediction(table, choice, law, s, df, drawn)


def forward(pts: pd.DataFrame, below_m: float, ceiling: float = 1.0,
            reps: pd.DataFrame | None = None, forms: Sequence[str] = FORMS) -> Prediction:
    """Fit on the models under ``below_m`` million parameters (the form chosen on
    them alone) and predict the bigger ones, measured beside."""
    small = pts[pts["params_m"] < below_m]
    big = pts[pts["params_m"] >= below_m]
    if big.empty or small.empty:
        raise FitError(f"--fit-below {below_m:g}M: {len(small)} points below and "
                       f"{len(big)} at or above; both sides need models")
    sub = None if reps is None else reps[reps["params_m"] < below_m]
    p = predict(small, big[COLUMNS[:-1]], ceiling, sub, forms=forms)
    table = p.table.assign(measured=100 * (1 - big["error"].to_numpy()))
    return Prediction(table.assign(miss=table["predicted"] - table["measured"]), p.choice,
                      p.law, p.residual_sd, p.df, p.resampled)



def held_out(pts: pd.DataFrame, ceiling: float = 1.0, reps: pd.DataFrame | None = None,
             resamples: int = 200, forms: Sequence[str] = FORMS) -> pd.DataFrame:
    """The whole procedure held out, model by model: choose() on the others, fit,
    predict the held-out model with predict()'s interval (with fewer than 4 models,
    the law chosen on all of them, said in ``law``). One row per held-out point
    (predicted, low, high, measured, miss, law, and ``chosen_without``: False where
    the law was chosen with the model in); a model whose others cannot choose a law
    gets NaN and ``law`` says why."""
    # With 3 models the others (2) cannot hold one out of a fit on one: the law is
    # then the one chosen on every model, its spread the misses of the others.
    overall = choose(pts, ceiling, forms) if pts["model"].nunique() < 4 else None
    out = []
    for model, held in pts.groupby("model", sort=False):
        rest = pts[pts["model"] != model]
        measured = 100 * (1 - held["error"])
        sub = None if reps is None else reps[reps["model"] != model]
        given = None if overall is None else Choice(
            overall.form, overall.terms, overall.scores,
            overall.residuals[overall.residuals["model"] != model], overall.skipped)
        try:
            p = predict(rest, held[COLUMNS[:-1]], ceiling, sub, resamples, forms=forms,
                        choice=given)
        except FitError as e:
            out.append(held.assign(predicted=np.nan, low=np.nan, high=np.nan,
                                   measured=measured, miss=np.nan, law=f"none: {e}",
                                   chosen_without=given is None))
            continue
        t = p.table
        out.append(held.assign(predicted=t["predicted"].to_numpy(), low=t["low"].to_numpy(),
                               high=t["high"].to_numpy(), measured=measured,
                               miss=t["predicted"].to_numpy() - measured,
                               law=p.choice.name + (" (chosen with it)" if given else ""),
                               chosen_without=given is None))
    return pd.concat(out, ignore_index=True)


def covered(held: pd.DataFrame) -> tuple[int, int]:
    """Held-out points (held_out's rows) inside their 95% prediction interval, and how
    many have an interval."""
    h = held.dropna(subset=["low"])
    return int(((h["measured"] >= h["low"]) & (h["measured"] <= h["high"])).sum()), len(h)
