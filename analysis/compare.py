"""Two studies side by side: a variant against the default, say.

    python -m analysis.report runs/model_size-local runs/short-ft

writes ``<second>/compare-<first>/report.html``: what differs between their
configurations (study.json), and for every (stage, model, label fraction) both
studies measured, the second's test top-1 minus the first's, paired within a
replicate (same seed and labelled subset), with its 95% Student-t interval over
independent replicates (analysis.replicates: values sharing a run or a draw count
once; a stage both studies reused from one run differs by exactly 0). Raw intervals:
a comparison of two studies is exploratory, never a verdict.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from analysis import collect, replicates
from analysis.tables import markdown_table, pct
from scaling import storage
from scaling.storage import Location

KEY = ["stage", "model", "label_fraction", "head_depth", "ft_layer", "seed", "subset_seed"]
STAGES = ("finetune", "supervised", "pixels", "distill")


def compare_table(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Second minus first, test top-1 points, per stage, model and label fraction,
    paired within a replicate; only what both measured."""
    def rows(df: pd.DataFrame) -> pd.DataFrame:
        keep = df[df["stage"].isin(STAGES) & df["top1"].notna()]
        return keep.drop_duplicates(KEY)[[*KEY, "top1", "runs"]]

    both = rows(a).merge(rows(b), on=KEY, suffixes=("_a", "_b"))
    out = []
    for (stage, model, lf), g in both.groupby(["stage", "model", "label_fraction"], sort=False):
        shared = list(g["runs_a"].combine(g["runs_b"], frozenset.union))
        mean, lo, hi, n = replicates.effect(100 * (g["top1_b"] - g["top1_a"]).to_numpy(),
                                            shared)
        out.append({"stage": stage, "model": model, "label fraction": pct(float(lf)),
                    "first top-1": round(100 * float(g["top1_a"].mean()), 2),
                    "second top-1": round(100 * float(g["top1_b"].mean()), 2),
                    "second - first (pp)": round(mean, 2),
                    "raw 95% interval": "n/a" if np.isnan(lo) else f"[{lo:.2f}, {hi:.2f}]",
                    "replicates": n})
    return pd.DataFrame(out)


def write_comparison(first: Location, second: Location) -> Location:
    """The comparison report of two study folders, written beside the second's."""
    from scaling.study.folder import difference

    a, b = collect.load(first), collect.load(second)
    spec_a, spec_b = collect.study_spec(first) or {}, collect.study_spec(second) or {}
    name_a, name_b = str(a["study"].iloc[0]), str(b["study"].iloc[0])
    table = compare_table(a, b)
    out = storage.join(second, f"compare-{name_a}")
    storage.write_text(out, "compare.csv", table.to_csv(index=False))
    storage.write_text(out, "compare.md", markdown_table(table) if not table.empty else "")
    differs = difference(spec_a, spec_b, most=12) if spec_a and spec_b else "unknown"
    body = (table.to_html(index=False, border=0, classes="t", na_rep="-") if not table.empty
            else "<p>The two studies share no (stage, model, label fraction, replicate).</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(name_b)} against {html.escape(name_a)}</title><style>"
            "body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
            "table.t{border-collapse:collapse;font-size:13px;max-width:100%}"
            "table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;"
            "overflow-wrap:anywhere}</style></head><body>"
            f"<h1>{html.escape(name_b)} against {html.escape(name_a)}</h1>"
            f"<p>What differs (first -> second): {html.escape(differs)}.</p>"
            "<p>Second minus first, test top-1 points, paired within a replicate (same seed "
            "and labelled subset); raw 95% Student-t intervals over independent replicates, "
            "exploratory: no verdict. A stage both studies reused from one run differs by "
            "exactly 0.</p>" + body + "</body></html>")
    storage.write_text(out, "report.html", page)
    return storage.join(out, "report.html")
