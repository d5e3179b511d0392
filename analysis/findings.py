"""The paper's four findings as measured effects with 95% intervals and a verdict,
from the tidy tables of the three studies:

    python -m analysis.findings runs/model_size-fmnist-cpu runs/head_depth-fmnist-cpu \\
        runs/distillation-fmnist-cpu [--out docs/findings]

- F1 pretraining + fine-tuning beats the best baseline without pretraining (the tuned
  supervised network or the pixel arm, chosen on validation) with few labels;
- F2 a self-distilled student matches or beats its teacher, and a distilled smaller
  model beats the same small model fine-tuned on the same labels;
- F3 a deeper head, fine-tuned from its middle layer, helps most with few labels;
- F4 bigger models gain more (relative to the smallest) with fewer labels.

Every effect is a mean over independent replicates of a difference paired within a
replicate, with its 95% Student-t interval (analysis.curves.mean_interval); values that
share a stage run (a crossed design's pretraining, a pooled row's) count once
(analysis.replicates).
Verdicts are Holm-adjusted across the table (one t-test of each effect against 0,
the raw interval still shown): 'reproduced' when the adjusted p < 0.05 and the effect
is on the paper's side of zero, 'reversed' when on the other, otherwise 'not
resolved', with the smallest effect these replicates could detect (80% power at the
strictest Holm level, 5% / the number of tests, and the observed spread).
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import numpy as np
import pandas as pd
from scipy import stats

from analysis import collect, replicates
from analysis.figures import findings_figure
from analysis.tables import gain
from scaling import storage

COLUMNS = ["finding", "comparison", "effect (pp)", "95% interval (pp)", "replicates",
           "p (Holm)", "verdict", "study"]
# The interval's ends as numbers (for figures), beside the printed columns.
NUMERIC = ["_lo", "_hi"]
ALPHA, POWER = 0.05, 0.8


def _test(mean: float, lo: float, hi: float, n: int) -> tuple[float, float]:
    """(two-sided p of the effect against 0, its standard error) from its Student-t
    interval (analysis.curves.mean_interval) over ``n`` replicates."""
    if n < 2 or np.isnan(lo):
        return float("nan"), float("nan")
    se = (hi - lo) / (2 * stats.t.ppf(1 - ALPHA / 2, n - 1))
    if se == 0:  # every replicate agrees
        return (0.0 if mean != 0 else 1.0), 0.0
    return float(2 * stats.t.sf(abs(mean / se), n - 1)), float(se)


def detectable(se: float, n: int, tests: int) -> float:
    """The smallest effect a two-sided t-test over ``n`` replicates finds with 80%
    power at the level the table's strictest Holm step asks (5% / ``tests``)."""
    level = ALPHA / max(tests, 1)
    return float((stats.t.ppf(1 - level / 2, n - 1) + stats.t.ppf(POWER, n - 1)) * se)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of p-values (nan stays nan, not counted)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def verdict(mean: float, p_adjusted: float, detectable: float) -> str:
    if np.isnan(p_adjusted):
        return "one replicate: no verdict"
    if p_adjusted < ALPHA:
        return "reproduced" if mean > 0 else "reversed"
    return f"not resolved (detectable: {detectable:.2f} pp)"


def _entry(finding: str, comparison: str, mean: float, lo: float, hi: float,
           replicates: int) -> dict:
    p, se = _test(mean, lo, hi, replicates)
    return {"finding": finding, "comparison": comparison, "effect (pp)": round(mean, 2),
            "95% interval (pp)": "n/a" if np.isnan(lo) else f"[{lo:.2f}, {hi:.2f}]",
            "replicates": replicates, "_lo": lo, "_hi": hi, "_p": p, "_se": se}


def _row(finding: str, comparison: str, values: pd.Series, shared: pd.Series) -> dict:
    """An effect from per-cell differences ``values`` (fractions) and the stage runs
    each rests on: values sharing a run count once (analysis.replicates)."""
    mean, lo, hi, n = replicates.effect(100 * values.to_numpy(dtype=float), list(shared))
    return _entry(finding, comparison, mean, lo, hi, n)


def _union(a: pd.Series, b: pd.Series) -> pd.Series:
    """Row by row, the stage runs of two paired values together."""
    return a.combine(b, frozenset.union)


def _pct(lf: float) -> str:
    return f"{100 * lf:g}%"


def f1(df: pd.DataFrame) -> list[dict]:
    """Fine-tuned minus the best baseline without pretraining (the tuned supervised
    network or the pixel arm, whichever is better on validation in the cell) at the
    fewest labels, per model (and head setting where it varies)."""
    g = gain(df, "best")
    if g.empty:
        return []
    few = g[g["label fraction"] == g["label fraction"].min()]
    return [_entry("F1", f"{r['model']} at {_pct(r['label fraction'])} labels: fine-tuned - "
                         "best baseline without pretraining",
                   r["gain (pp)"], r["_lo"], r["_hi"], r["replicates"])
            for _, r in few.iterrows()]


REPLICATE = ["seed", "subset_seed"]  # a replicate: its seeds (the labels they draw)
# What a fine-tuned small model must share with a distillation's teacher to stand beside
# its student (F2): the recipe, not the architecture.
SAME_RECIPE = ["data.name", "data.image_size", "pretrain.epochs", "head.num_layers",
               "finetune.head_layer", "finetune.epochs", "finetune.min_steps",
               "finetune.lr_grid"]


def same_fraction(column: pd.Series, value: object) -> pd.Series:
    """Rows whose value equals ``value``, lists (an LR grid) and missing values
    included: compared as JSON text, never element by element."""
    def text(v: object) -> str:
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, int | float) and not isinstance(v, bool):  # 3 and 3.0 alike
            return "null" if np.isnan(v) else repr(float(v))
        return json.dumps(v, default=str)
    return column.map(text) == text(value)


def f2(df: pd.DataFrame, finetuned: pd.DataFrame | None = None) -> list[dict]:
    """As the paper states it, on the training images (other unlabelled sets are
    reported apart): a self-distilled student minus its teacher, and a distilled
    smaller student minus the same small model fine-tuned on the same labels, looked
    up in ``finetuned`` (default ``df``; findings() passes every study's rows, so the
    model-size study's fine-tuned small models serve the distillation study)."""
    pool = df if finetuned is None else finetuned
    d = df[(df["stage"] == "distill") & df["top1"].notna() & df["teacher_top1"].notna()]
    d = d[d["unlabelled"] == d["data.name"]]
    out = []
    for (model, student, lf), g in d.groupby(["model", "student", "label_fraction"], sort=False):
        if student == "self":
            out.append(_row("F2", f"{model} -> itself at {_pct(lf)} labels: student - teacher",
                            g["top1"] - g["teacher_top1"], g["runs"]))
            continue
        ft = pool[(pool["stage"] == "finetune") & (pool["model"] == student)
                  & (pool["label_fraction"] == lf)]
        for col in SAME_RECIPE:  # the small model trained as the teacher was
            if col in ft and col in g:
                ft = ft[same_fraction(ft[col], g[col].iloc[0])]
        ft = ft.drop_duplicates("stage_key")
        both = g.reset_index().merge(ft[[*REPLICATE, "top1", "runs"]], on=REPLICATE,
                                     suffixes=("", "_ft"))
        if both.empty:  # the study did not fine-tune the small model itself
            continue
        out.append(_row("F2", f"{model} -> {student} at {_pct(lf)} labels: distilled "
                              f"{student} - fine-tuned {student}",
                        both["top1"] - both["top1_ft"],
                        _union(both["runs"], both["runs_ft"])))
    return out


def f3(df: pd.DataFrame, deep: tuple[int, int] = (3, 1), shallow: tuple[int, int] = (2, 0)
       ) -> list[dict]:
    """Fine-tuned top-1 of a deep head from its middle layer minus SimCLR v1's
    (2-layer head, fine-tuned from the encoder), at the fewest and the most labels,
    and how much larger the effect is with few labels."""
    ft = df[df["stage"] == "finetune"][["model", "label_fraction", *REPLICATE, "head_depth",
                                        "ft_layer", "top1", "runs"]]

    def setting(hd: int, layer: int) -> pd.DataFrame:
        return ft[(ft["head_depth"] == hd) & (ft["ft_layer"] == layer)].drop(
            columns=["head_depth", "ft_layer"])

    a, b = setting(*deep), setting(*shallow)
    if a.empty or b.empty:
        return []
    both = a.merge(b, on=["model", "label_fraction", *REPLICATE], suffixes=("_a", "_b"))
    both["d"] = both["top1_a"] - both["top1_b"]
    both["runs"] = _union(both["runs_a"], both["runs_b"])
    out = []
    name = f"head {deep[0]} from layer {deep[1]} - head {shallow[0]} from layer {shallow[1]}"
    few, many = both["label_fraction"].min(), both["label_fraction"].max()
    for model, g in both.groupby("model", sort=False):
        for lf in sorted({few, many}):
            at = g[g["label_fraction"] == lf]
            out.append(_row("F3", f"{model} at {_pct(lf)} labels: {name}", at["d"], at["runs"]))
        if few != many:
            w = g[g["label_fraction"] == few].merge(g[g["label_fraction"] == many],
                                                    on=REPLICATE, suffixes=("_f", "_m"))
            out.append(_row("F3", f"{model}: the effect at {_pct(few)} minus at {_pct(many)}",
                            w["d_f"] - w["d_m"],
                            _union(w["runs_f"], w["runs_m"])))
    return out


def f4(df: pd.DataFrame) -> list[dict]:
    """The biggest model's relative improvement over the smallest (fine-tuned) at the
    fewest labels minus at the most: above 0, bigger models gain more with fewer labels.
    Pooled over head settings where they vary; settings that share a pretraining run
    (or anything else) count once."""
    ft = df[(df["stage"] == "finetune") & df["relative_improvement"].notna()]
    if ft["params"].nunique() < 2 or ft["label_fraction"].nunique() < 2:
        return []
    on = ["head_depth", "ft_layer", *REPLICATE]
    big = ft[ft["params"] == ft["params"].max()]
    small = ft[ft["params"] == ft["params"].min()]
    # tidy's relative_improvement, resting on the smallest model's runs too.
    rel = big.merge(small[[*on, "label_fraction", "runs"]], on=[*on, "label_fraction"],
                    suffixes=("", "_small"))
    rel["rel"] = rel["relative_improvement"]
    rel["runs"] = _union(rel["runs"], rel["runs_small"])
    few, many = rel["label_fraction"].min(), rel["label_fraction"].max()
    w = rel[rel["label_fraction"] == few].merge(rel[rel["label_fraction"] == many], on=on,
                                                 suffixes=("_f", "_m"))
    model, least = str(big["model"].iloc[0]), str(small["model"].iloc[0])
    return [_row("F4", f"{model} over {least}: relative gain at {_pct(few)} minus at "
                       f"{_pct(many)} labels", w["rel_f"] - w["rel_m"],
                 _union(w["runs_f"], w["runs_m"]))]


def findings(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """F1-F4 from whichever studies' tidy tables are given."""
    rows: list[dict] = []
    every = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    for df in tables:
        study = str(df["study"].iloc[0]) if len(df) else ""
        rows += [r | {"study": study} for r in f1(df) + f2(df, every) + f3(df) + f4(df)]
    adjusted = holm(np.array([r["_p"] for r in rows]))
    tests = int(np.isfinite(adjusted).sum())
    for r, p in zip(rows, adjusted, strict=True):
        r["p (Holm)"] = "n/a" if np.isnan(p) else f"{p:.3g}"
        least = detectable(r["_se"], r["replicates"], tests) if np.isfinite(p) else np.nan
        r["verdict"] = verdict(r["effect (pp)"], p, least)
    return pd.DataFrame(rows, columns=COLUMNS + NUMERIC).sort_values(
        "finding", kind="stable", ignore_index=True)


def markdown(table: pd.DataFrame) -> str:
    """The printed columns as a Markdown table (docs/results.md takes it as is)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |"
              for row in table[COLUMNS].itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.findings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", nargs="+", help="study storages, e.g. runs/model_size-fmnist-cpu")
    p.add_argument("--out", help="also write findings.md, findings.csv and findings.png "
                                 "(the figure) into this directory or URI")
    args = p.parse_args(argv)
    try:
        tables = [collect.load(storage.absolute(storage.parse(s))) for s in args.studies]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = findings(tables)
    text = markdown(table)
    print(text, end="")
    if args.out:
        out = storage.absolute(storage.parse(args.out))
        storage.write_text(out, "findings.md", text)
        storage.write_text(out, "findings.csv", table.to_csv(index=False))
        if not table.empty:
            fig = findings_figure(table)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            storage.write_bytes(out, "findings.png", buf.getvalue())
        print(f"wrote findings.md, findings.csv{', findings.png' if not table.empty else ''} "
              f"in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
