"""A power plan from a pilot: how many independent replicates each primary finding
needs to detect a stated effect, from the spread the pilot measured.

    rows = spreads("docs/findings/pilot-2026-12-06.csv")      # or a study folder with results
    for line in plan_lines(rows, ["P:1/16x"], target=5.0): print(line)

The spread of a finding is the standard deviation of its per-replicate differences,
recovered from the pilot's 95% Student-t interval (sd = half-width / t * sqrt(n)): it
rests on n - 1 degrees of freedom, which the plan prints, since a spread from 3
replicates is itself uncertain (its 95% interval spans 0.52x to 6.3x).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis import collect, power
from analysis.findings import findings, is_primary
from scaling import storage


def spreads(pilot: str) -> pd.DataFrame:
    """finding, comparison, effect, unit, replicates and sd (per replicate) of every
    effect of a pilot: a findings CSV (``python -m analysis.findings --out``) or a
    study folder or URI with results."""
    if pilot.endswith(".csv"):
        table = pd.read_csv(io.StringIO(Path(pilot).read_text()))
        if "effect" not in table:  # written before issue 36 named the premise P
            table = table.rename(columns={"effect (pp)": "effect"})
            premise = (table["finding"] == "F1") & table["comparison"].str.contains(
                "best baseline without pretraining")
            table.loc[premise, "finding"] = "P"
            table["unit"] = np.where(table["finding"] == "F4", "%", "pp")
    else:
        table = findings([collect.load(storage.absolute(storage.parse(pilot)))])
    n = table["replicates"].astype(int)
    t = stats.t.ppf(0.975, np.maximum(n - 1, 1))
    sd = (table["_hi"] - table["_lo"]) / (2 * t) * np.sqrt(n)
    out = table[["finding", "comparison", "effect", "unit", "replicates"]].copy()
    out["sd"] = sd.where(n >= 2)
    return out


def primary_rows(rows: pd.DataFrame, primaries: Sequence[str]) -> pd.DataFrame:
    """The pilot's rows the primaries name (findings.is_primary)."""
    return rows[[is_primary(f, c, primaries) for f, c in
                 zip(rows["finding"], rows["comparison"], strict=True)]]


def plan_lines(rows: pd.DataFrame, primaries: Sequence[str], target: float,
               cost: Callable[[int], str] | None = None, batch: int = 3) -> list[str]:
    """Per primary effect of the pilot: replicates needed to detect ``target`` (in the
    effect's unit) with 80% power at Holm's strictest level over the primaries, fixed
    and as a sequential design (power.sequential_plan, looks every ``batch``), and
    ``cost(n)`` of n replicates where given."""
    chosen = primary_rows(rows, primaries)
    if chosen.empty:
        return [f"power plan: the pilot has no effect matching --primary {','.join(primaries)}"]
    m = len(chosen)
    lines = [f"power plan: {m} primary effect{'s' if m > 1 else ''}, Holm's strictest level "
             f"0.05/{m}; target {target:g} in each effect's unit; 80% power (exact noncentral t)"]
    for _, r in chosen.iterrows():
        head = f"  {r['finding']} {r['comparison']}"
        if not np.isfinite(r["sd"]):
            lines.append(f"{head}: the pilot has one replicate: no spread, no plan")
            continue
        n = power.replicates_needed(float(r["sd"]), target, 0.05 / m)
        looks = power.sequential_plan(float(r["sd"]), target, m, first=batch, batch=batch)
        lo, hi = sd_interval(int(r["replicates"]))
        spread = (f"pilot {r['effect']:+.2f} {r['unit']}, spread (sd) {r['sd']:.2f} from "
                  f"{int(r['replicates'])} replicates ({int(r['replicates']) - 1} df: the "
                  f"true sd is {lo:.2f}x-{hi:.2f}x of it, 95%)")
        if n is None:
            lines.append(f"{head}: {spread}; over 10,000 replicates needed: not decidable")
            continue
        fixed = f"{n} replicates fixed" + (f" ({cost(n)})" if cost else "")
        seq = ("" if looks is None else f"; sequential: looks at {looks[0]}..{looks[-1]} every "
               f"{batch}, at most {looks[-1]}" + (f" ({cost(looks[-1])})" if cost else ""))
        lines.append(f"{head}: {spread}; {fixed}{seq}")
    return lines


def sd_interval(n: int) -> tuple[float, float]:
    """The 95% interval of sd_true / sd_estimated from n replicates (chi-square)."""
    df = n - 1
    return (math.sqrt(df / stats.chi2.ppf(0.975, df)), math.sqrt(df / stats.chi2.ppf(0.025, df)))
