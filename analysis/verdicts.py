"""The one verdict policy's words, shared by the findings table and everything that
quotes it (the headline, the summary, the figures' captions): which family a verdict
was adjusted in, and whether a verdict decides."""

from __future__ import annotations

import pandas as pd

from analysis.power import ALPHA

PRIMARY, EXPLORATORY = "primary", "exploratory"
DECIDED = ("reproduced", "reversed")


def decided(verdict_text: str) -> bool:
    return verdict_text.split(" ")[0] in DECIDED


def family_note(table: pd.DataFrame) -> str:
    """One sentence: which family the verdicts were adjusted in."""
    n = int((table["role"] == PRIMARY).sum()) if not table.empty else 0
    if n == 0:
        return ("no primary findings were registered before the run: every verdict is "
                f"exploratory (Holm over the {len(table)} effects)")
    level = float(table.attrs.get("level", ALPHA))
    at = (f" at {level:.3g}, the level the sequential design's look spends" if level < ALPHA
          else "")
    effects = "effect" if n == 1 else "effects"
    rest = len(table) - n
    return (f"verdicts Holm-adjusted over the {n} pre-registered primary {effects}{at}"
            + (f"; the other {rest} are exploratory (Holm among themselves)" if rest else ""))
