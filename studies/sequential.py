"""``--until-decided --budget DURATION``: add independent replicates in batches until
every primary finding is decided or the budget is spent, with an error rate fixed in
advance.

The design is set before the first replicate and recorded in study.json with the
primaries: its largest size (the sequential plan's replicates for the target effect
from the pilot's spreads, capped by what the budget buys at the dry run's estimate),
its looks (every ``--batch`` replicates) and each look's level, the error the
Lan-DeMets O'Brien-Fleming spending function adds since the look before
(analysis.power.spending). The study stops at the first look where the Holm-adjusted
test decides every primary at that look's level. The levels sum to 0.05, so the
chance of any false decision over all looks is at most 0.05 (union bound;
tests/test_findings.py simulates it), and the final look alone has the plan's power.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from analysis import power
from analysis.verdicts import PRIMARY, decided
from scaling.config import ConfigError

DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """'2h30m', '90m', '45s', '1.5h' -> seconds."""
    m = DURATION.fullmatch(text.strip())
    if not text.strip() or m is None or not any(m.groups()):
        raise ConfigError("--budget", text, "a duration such as 2h30m, 90m or 3600s")
    h, mins, s = (float(g) if g else 0.0 for g in m.groups())
    return 3600 * h + 60 * mins + s


def design(sds: list[float], target: float, batch: int, per_replicate_s: float,
           budget_s: float, alpha: float = power.ALPHA) -> dict[str, Any]:
    """The sequential design for primaries with per-replicate spreads ``sds``: the
    plan's size for ``target`` (the largest any primary needs), capped by what
    ``budget_s`` buys at ``per_replicate_s`` a replicate; looks every ``batch``."""
    plans = [power.sequential_plan(sd, target, len(sds), first=batch, batch=batch,
                                   alpha=alpha) for sd in sds]
    if any(p is None for p in plans):
        raise ConfigError("--target-effect", target, "an effect the pilot's spreads can "
                          "detect with at most 10,000 replicates")
    planned = max(p[-1] for p in plans if p is not None)
    afford = int(budget_s // per_replicate_s) if per_replicate_s > 0 else planned
    size = min(planned, afford)
    if size < 2:
        raise ConfigError("--budget", f"{budget_s:.0f} s", f"at least 2 replicates' time: "
                          f"one takes ~{per_replicate_s:.0f} s here (dry-run estimate)")
    looks = [*range(batch, size, batch), size] if size > batch else [size]
    return {"looks": looks, "levels": power.spending([k / size for k in looks], alpha),
            "alpha": alpha, "spending": "Lan-DeMets O'Brien-Fleming, levels by union bound",
            "planned": planned, "target_effect": target, "budget_s": budget_s,
            "per_replicate_s": per_replicate_s,
            "registered": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def all_decided(found: pd.DataFrame) -> bool:
    primary = found[found["role"] == PRIMARY]
    return not primary.empty and bool(primary["verdict"].map(decided).all())


def run_looks(plan: dict[str, Any], run_look: Callable[[int, float], pd.DataFrame],
              say: Callable[[str], None] = print,
              clock: Callable[[], float] = time.monotonic) -> tuple[pd.DataFrame, int]:
    """Run the design's looks in order (``run_look(n, level)`` runs the first n
    replicates and returns the findings at that level) until every primary is decided
    or the budget would be spent by the next look; returns the last findings and
    the replicates they rest on."""
    start = clock()
    found, n = pd.DataFrame(), 0
    for k, (n, level) in enumerate(zip(plan["looks"], plan["levels"], strict=True)):
        found = run_look(n, level)
        primary = found[found["role"] == PRIMARY] if not found.empty else found
        say(f"look {k + 1}/{len(plan['looks'])}: {n} replicates, level {level:.3g}: "
            + "; ".join(f"{r['comparison']}: {r['verdict']}" for _, r in primary.iterrows()))
        if all_decided(found):
            say(f"every primary finding decided at look {k + 1}: stopping")
            break
        if k + 1 < len(plan["looks"]):
            spent = clock() - start
            more = (plan["looks"][k + 1] - n) * plan["per_replicate_s"]
            if spent + more > plan["budget_s"]:
                say(f"the budget ({plan['budget_s']:.0f} s) would be spent by the next look "
                    f"({spent:.0f} s used, ~{more:.0f} s more): stopping undecided")
                break
    return found, n
