"""The scaling laws checked out of sample, as the report shows them: which law
predicts a held-out model best, how far each held-out model was missed, and a
forward prediction of the biggest models from the smaller ones.

    v = validate(df)                      # a tidy table: a study's or a published one
    v.choice.name, v.held.miss.abs().median()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import laws
from analysis.curves import FitError, ceiling_of

WITHIN = 2.0  # points: the miss the issue that asked for this called a good prediction


@dataclass
class Validation:
    choice: laws.Choice | None = None  # on every model
    held: pd.DataFrame = field(default_factory=pd.DataFrame)  # laws.held_out rows
    forward: laws.Prediction | None = None
    below_m: float = float("nan")  # the forward fit's size limit (millions)
    in_sample: dict[str, float] = field(default_factory=dict)  # candidate -> rmse of log error
    notes: list[str] = field(default_factory=list)

    def missed(self) -> list[str]:
        """Models whose held-out prediction missed some label count by more than WITHIN."""
        h = self.held.dropna(subset=["miss"])
        worst = h.assign(a=h["miss"].abs()).groupby("model", sort=False)["a"].max()
        return [f"{m} (up to {v:.1f})" for m, v in worst.items() if v > WITHIN]


def validate(df: pd.DataFrame, below_m: float | None = None, resamples: int = 200
             ) -> Validation:
    """Choose the law on every model, hold each model out in turn (the choice
    included), and predict the models at or above ``below_m`` million parameters
    (default: the biggest model alone) from the smaller ones."""
    v = Validation()
    try:
        pts = laws.points(df)
    except FitError as e:
        v.notes.append(str(e))
        return v
    if pts["model"].nunique() < 3:
        v.notes.append(f"{pts['model'].nunique()} model(s): a law checked out of sample needs "
                       ">= 3 (fit on two, predict the third)")
        return v
    ceiling = ceiling_of(df)
    reps = laws.replicate_points(df)
    try:
        v.choice = laws.choose(pts, ceiling)
    except FitError as e:
        v.notes.append(str(e))
        return v
    for name, (form, terms) in v.choice.candidates.items():
        v.in_sample[name] = laws.fit(pts, form, terms, ceiling).rmse_log
    v.held = laws.held_out(pts, ceiling, reps, resamples)
    v.below_m = float(pts["params_m"].max()) if below_m is None else below_m
    try:
        v.forward = laws.forward(pts, v.below_m, ceiling, reps)
    except FitError as e:
        v.notes.append(f"forward prediction from the models under {v.below_m:.3g}M: {e}")
    return v


def candidates_table(v: Validation) -> pd.DataFrame:
    """Each law checked: its out-of-sample error (what chose), best first."""
    if v.choice is None:
        return pd.DataFrame()
    rows = []
    for name, score in sorted(v.choice.scores.items(), key=lambda kv: kv[1]):
        rows.append({"law": name, "mean |miss| (points)": round(score, 2),
                     "chosen": "yes" if name == v.choice.name else ""})
    return pd.DataFrame(rows)


def held_table(v: Validation) -> pd.DataFrame:
    """Per held-out model: its largest and mean |miss| and the law chosen without it."""
    h = v.held.dropna(subset=["miss"])
    if h.empty:
        return pd.DataFrame()
    g = h.assign(a=h["miss"].abs()).groupby("model", sort=False)
    return pd.DataFrame({"model": list(g.groups), "mean |miss|": g["a"].mean().round(2).values,
                         "largest |miss|": g["a"].max().round(2).values,
                         "law (chosen without it, unless said)": g["law"].first().values})


def summary_lines(v: Validation) -> list[str]:
    """What the validation says, in sentences computed from its numbers."""
    if v.choice is None:
        return ["no law checked"]
    inside, total = laws.covered(v.held)
    miss = v.held["miss"].abs().dropna()
    nested = bool(v.held["chosen_without"].all())
    out = [f"law chosen: {v.choice.name} (smallest mean |miss| holding each model out: "
           f"{v.choice.scores[v.choice.name]:.2f} points)"]
    if len(miss):
        out.append(("whole procedure held out (the law chosen without the model)" if nested
                    else "each model predicted by the law chosen on all (too few models to "
                    "choose without it)")
                   + f": median |miss| {np.median(miss):.2f} points over {len(miss)} points "
                   f"of {v.held['model'].nunique()} models; {inside} of {total} inside their "
                   "95% prediction intervals")
    for term in laws.TERMS:
        base = laws.name_of(v.choice.form, ())
        with_term = laws.name_of(v.choice.form, (term,))
        if with_term in v.choice.scores:
            earns = v.choice.scores[with_term] < v.choice.scores[base]
            out.append(f"{term} term: {'earns' if earns else 'does not earn'} its place out of "
                       f"sample ({v.choice.scores[with_term]:.2f} with it, "
                       f"{v.choice.scores[base]:.2f} without)")
    missed = v.missed()
    out.append(f"missed by more than {WITHIN:g} points held out: " + (", ".join(missed)
                                                                   if missed else "none"))
    if v.forward is not None:
        f = v.forward.table
        out.append(f"forward, from the models under {v.below_m:.3g}M (law {v.forward.choice.name}"
                   "): " + "; ".join(
                       f"{r['model']} at {r['labels']:,.0f} labels {r['predicted']:.1f} "
                       f"[{r['low']:.1f}, {r['high']:.1f}], measured {r['measured']:.1f}"
                       for _, r in f.iterrows()))
    return out
