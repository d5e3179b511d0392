"""The paper's claims as measured effects with 95% intervals and a verdict, from the
tidy tables of the studies:

    python -m analysis.findings runs/model_size-fmnist-cpu runs/head_depth-fmnist-cpu \\
        runs/distillation-fmnist-cpu [--out docs/findings]

- P  (the premise) pretraining + fine-tuning beats the best baseline without
  pretraining (the tuned supervised network or the pixel arm, chosen on validation),
  at every label count (the paper's claim: at few);
- F1 "the fewer the labels, the more [pretraining] benefits from a bigger network":
  the gain of the widest model minus the narrowest's at the fewest labels, and the
  widest model's gain at the fewest minus at the most labels;
- F2 distillation: a self-distilled student against its teacher, and a distilled
  smaller model against the same small model fine-tuned on the same labels;
- F3 "bigger projection heads improve representation learning": a deeper head,
  fine-tuned from its middle layer, against SimCLR v1's, at few and many labels;
- F4 Figure 1 (right): the biggest model's relative improvement over the smallest,
  at the fewest minus at the most labels (in % of the smallest's top-1, not points).

Every effect is a mean over independent replicates of a difference paired within a
replicate, with its 95% Student-t interval (analysis.curves.mean_interval); values that
share a stage run, a seed or a labelled subset count once (analysis.replicates).

One verdict policy, used by the headline, the report's summary and docs/results.md:
a two-sided t-test of each effect against 0, Holm-adjusted within its family. The
family is the study's pre-registered primary findings (study.json's ``primaries``,
``--primary`` of studies/*.py); everything else is a second family, labelled
exploratory. A study without primaries has only exploratory findings. 'reproduced'
when the adjusted p < 0.05 and the effect is on the paper's side of zero, 'reversed'
on the other, otherwise 'not decided', with the smallest effect the test could find
with 80% power (exact noncentral t, analysis.power, at Holm's strictest level).
Raw intervals are shown beside, never as verdicts.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from analysis import collect, power, replicates
from analysis.figures import findings_figure, fit_width
from analysis.tables import gain
from analysis.verdicts import EXPLORATORY, PRIMARY, family_note
from scaling import storage
from scaling.config import ConfigError

COLUMNS = ["finding", "role", "comparison", "effect", "unit", "95% interval", "replicates",
           "p (Holm)", "verdict", "study"]
# The interval's ends as numbers (for figures), beside the printed columns.
NUMERIC = ["_lo", "_hi"]
ALPHA, POWER = power.ALPHA, power.POWER
FINDINGS = {"P": "pretraining beats the best baseline without it at the fewest labels",
            "F1": "bigger models gain more from pretraining, the more so with fewer labels",
            "F2": "distillation: a student matches its teacher; a distilled small model "
                  "beats it fine-tuned",
            "F3": "a deeper projection head helps, most with few labels",
            "F4": "relative improvement of the biggest model is larger with fewer labels"}


def parse_primaries(text: str | Iterable[str]) -> list[str]:
    """'P:1/16x,F2' -> ['P:1/16x', 'F2']: a finding, optionally narrowed to the rows
    whose comparison contains the text after ':'. Unknown findings raise ConfigError."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    for item in items:
        name = item.split(":", 1)[0]
        if name not in FINDINGS:
            raise ConfigError("--primary", item, "findings among " + ", ".join(FINDINGS)
                              + ", each optionally FINDING:TEXT (rows whose comparison "
                                "contains TEXT), comma-separated, e.g. P:1/16x,F2")
    if not items:
        raise ConfigError("--primary", text, "at least one finding, e.g. P:1/16x,F2")
    return items


def is_primary(finding: str, comparison: str, primaries: Iterable[str]) -> bool:
    for item in primaries:
        name, _, narrow = item.partition(":")
        if name == finding and narrow in comparison:
            return True
    return False


def _test(mean: float, lo: float, hi: float, n: int) -> tuple[float, float]:
    """(two-sided p of the effect against 0, its standard error) from its Student-t
    interval (analysis.curves.mean_interval) over ``n`` replicates."""
    if n < 2 or np.isnan(lo):
        return float("nan"), float("nan")
    se = (hi - lo) / (2 * stats.t.ppf(1 - ALPHA / 2, n - 1))
    if se == 0:  # every replicate agrees
        return (0.0 if mean != 0 else 1.0), 0.0
    return float(2 * stats.t.sf(abs(mean / se), n - 1)), float(se)


def detectable(se: float, n: int, tests: int, level: float = ALPHA) -> float:
    """The smallest effect a two-sided t-test over ``n`` replicates finds with 80%
    power at the level the family's strictest Holm step asks (``level`` / ``tests``):
    exact, from the noncentral t (analysis.power)."""
    return power.detectable(se, n, level / max(tests, 1))


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


def verdict(mean: float, p_adjusted: float, detectable: float, n: int = 0,
            unit: str = "pp", level: float = ALPHA) -> str:
    """The verdict words of the one policy (module docstring)."""
    if np.isnan(p_adjusted):
        return "one run per model: no interval" if n <= 1 else "no verdict"
    if p_adjusted < level:
        return "reproduced" if mean > 0 else "reversed"
    return (f"not decided (80% power needs {detectable:.2f} {unit}; spread from {n} "
            f"replicates, {n - 1} df)")


def _entry(finding: str, comparison: str, mean: float, lo: float, hi: float,
           replicates: int, unit: str = "pp") -> dict:
    p, se = _test(mean, lo, hi, replicates)
    return {"finding": finding, "comparison": comparison, "effect": round(mean, 2),
            "unit": unit,
            "95% interval": "n/a" if np.isnan(lo) else f"[{lo:.2f}, {hi:.2f}]",
            "replicates": replicates, "_lo": lo, "_hi": hi, "_p": p, "_se": se}


def _row(finding: str, comparison: str, values: pd.Series, shared: pd.Series,
         unit: str = "pp") -> dict:
    """An effect from per-cell differences ``values`` (fractions) and the runs and
    draws each rests on: values sharing one count once (analysis.replicates)."""
    mean, lo, hi, n = replicates.effect(100 * values.to_numpy(dtype=float), list(shared))
    return _entry(finding, comparison, mean, lo, hi, n, unit)


def _union(a: pd.Series, b: pd.Series) -> pd.Series:
    """Row by row, the stage runs of two paired values together."""
    return a.combine(b, frozenset.union)


def _pct(lf: float) -> str:
    return f"{100 * lf:g}%"


def premise(df: pd.DataFrame) -> list[dict]:
    """P, the premise the paper's claims rest on: "task-agnostic use of unlabeled
    data" by pretraining + fine-tuning beats learning from the labels alone.
    Fine-tuned minus the best baseline without pretraining (the tuned supervised
    network or the pixel arm, whichever is better on validation in the cell), per
    model (and head setting where it varies), at every label count, fewest first:
    the paper's claim is about few labels (a study's primaries name which count it
    tests, e.g. P:0.1%), the others say what pretraining buys as labels grow."""
    g = gain(df, "best")
    if g.empty:
        return []
    g = g.sort_values(["label fraction", "params"], kind="stable")
    return [_entry("P", f"{r['model']} at {_pct(r['label fraction'])} labels: fine-tuned - "
                        "best baseline without pretraining",
                   r["gain (pp)"], r["_lo"], r["_hi"], r["replicates"])
            for _, r in g.iterrows()]


def _gains(df: pd.DataFrame) -> pd.DataFrame:
    """Fine-tuned rows with their gain over the best baseline and what it rests on."""
    ft = df[(df["stage"] == "finetune") & df["gain_over_best"].notna()]
    return ft.assign(runs=replicates.links(df, ft, ("finetune", "supervised", "pixels")))


def f1(df: pd.DataFrame) -> list[dict]:
    """The paper's F1 (abstract): "the fewer the labels, the more this approach
    (task-agnostic use of unlabeled data) benefits from a bigger network"; section
    4.1: "bigger models are more label-efficient". Two contrasts of the gain over the
    best baseline without pretraining, each paired within a replicate (same seed and
    labelled subset; a baseline the two share cancels exactly):

    - the widest model's gain minus the narrowest's, at the fewest labels;
    - the widest model's gain at the fewest labels minus at the most.

    A table without a baseline at the fewest labels (the paper's Table 1 gives the
    supervised network at 100% only) gets the contrast in fine-tuned top-1 instead:
    widest minus narrowest at the fewest labels minus at the most."""
    ft = _gains(df)
    every = df[(df["stage"] == "finetune") & df["top1"].notna()]
    if every["label_fraction"].nunique() > 1 and (
            ft.empty or ft["label_fraction"].min() > every["label_fraction"].min()):
        return [_top1_contrast(df, every)]
    if ft["params"].nunique() < 2:
        return []
    on = ["head_depth", "ft_layer", *REPLICATE, "label_fraction"]
    big = ft[ft["params"] == ft["params"].max()]
    small = ft[ft["params"] == ft["params"].min()]
    few, many = ft["label_fraction"].min(), ft["label_fraction"].max()
    wide, narrow = str(big["model"].iloc[0]), str(small["model"].iloc[0])
    pair = big.merge(small, on=on, suffixes=("_b", "_s"))
    at = pair[pair["label_fraction"] == few]
    out = [_row("F1", f"{wide} - {narrow} at {_pct(few)} labels: gain over the best "
                      "baseline without pretraining",
                at["gain_over_best_b"] - at["gain_over_best_s"], _union(at["runs_b"],
                                                                        at["runs_s"]))]
    if few != many:
        keys = on[:-1]
        w = big[big["label_fraction"] == few].merge(big[big["label_fraction"] == many],
                                                     on=keys, suffixes=("_f", "_m"))
        out.append(_row("F1", f"{wide}: gain over the best baseline at {_pct(few)} minus at "
                              f"{_pct(many)} labels",
                        w["gain_over_best_f"] - w["gain_over_best_m"],
                        _union(w["runs_f"], w["runs_m"])))
    return out


def _top1_contrast(df: pd.DataFrame, ft: pd.DataFrame) -> dict:
    """F1 without baselines: (widest - narrowest fine-tuned top-1) at the fewest
    labels minus at the most, paired within a replicate."""
    ft = ft.assign(runs=replicates.links(df, ft, ("finetune",)))
    on = ["head_depth", "ft_layer", *REPLICATE, "label_fraction"]
    big, small = ft[ft["params"] == ft["params"].max()], ft[ft["params"] == ft["params"].min()]
    pair = big.merge(small, on=on, suffixes=("_b", "_s"))
    pair["d"] = pair["top1_b"] - pair["top1_s"]
    pair["runs"] = _union(pair["runs_b"], pair["runs_s"])
    few, many = ft["label_fraction"].min(), ft["label_fraction"].max()
    w = pair[pair["label_fraction"] == few].merge(pair[pair["label_fraction"] == many],
                                                   on=on[:-1], suffixes=("_f", "_m"))
    wide, narrow = str(big["model"].iloc[0]), str(small["model"].iloc[0])
    return _row("F1", f"{wide} - {narrow} fine-tuned top-1 at {_pct(few)} minus at "
                      f"{_pct(many)} labels (no baseline at {_pct(few)})",
                w["d_f"] - w["d_m"], _union(w["runs_f"], w["runs_m"]))


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
    """The paper's section 4.3: "distillation using unlabeled data improves
    semi-supervised learning"; the abstract: distilling "into a smaller network with
    little loss in top-1 accuracy". On the training images (other unlabelled sets are
    reported apart): a self-distilled student minus its teacher, and a distilled
    smaller student minus the same small model fine-tuned on the same labels, looked
    up in ``finetuned`` (default ``df``; findings() passes every study's rows, so the
    model-size study's fine-tuned small models serve the distillation study)."""
    pool = df if finetuned is None else finetuned
    if "teacher_top1" not in df:  # no distillation ran
        return []
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
    """The paper's section 4.2: "bigger projection heads improve representation
    learning", fine-tuned "from a middle layer of the projection head", most with few
    labels. Fine-tuned top-1 of a deep head from its middle layer minus SimCLR v1's
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
    """The paper's Figure 1 (right): fine-tuned "relative improvement" of bigger
    models over the smallest, larger with fewer labels. The biggest model's relative
    improvement over the smallest at the fewest labels minus at the most, in % of the
    smallest model's top-1 (not points): above 0, bigger models gain more with fewer
    labels.
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
                 _union(w["runs_f"], w["runs_m"]), unit="%")]


def findings(tables: list[pd.DataFrame], primaries: Iterable[str] = (),
             level: float = ALPHA) -> pd.DataFrame:
    """P and F1-F4 from whichever studies' tidy tables are given, each row a primary
    (one of ``primaries``, parse_primaries' form) or exploratory, and each family
    Holm-adjusted on its own. ``level``: the primaries' (a sequential design's look
    spends less than 0.05; exploratory effects stay at 0.05)."""
    primaries = list(primaries)
    rows: list[dict] = []
    every = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    for df in tables:
        study = str(df["study"].iloc[0]) if len(df) else ""
        rows += [r | {"study": study} for r in
                 premise(df) + f1(df) + f2(df, every) + f3(df) + f4(df)]
    for r in rows:
        r["role"] = PRIMARY if is_primary(r["finding"], r["comparison"], primaries) \
            else EXPLORATORY
    for role in (PRIMARY, EXPLORATORY):
        family = [r for r in rows if r["role"] == role]
        adjusted = holm(np.array([r["_p"] for r in family]))
        tests = int(np.isfinite(adjusted).sum())
        at = level if role == PRIMARY else ALPHA
        for r, p in zip(family, adjusted, strict=True):
            r["p (Holm)"] = "n/a" if np.isnan(p) else f"{p:.3g}"
            least = (detectable(r["_se"], r["replicates"], tests, at) if np.isfinite(p)
                     else np.nan)
            r["verdict"] = verdict(r["effect"], p, least, r["replicates"], r["unit"], at)
    order = {f: i for i, f in enumerate(FINDINGS)}
    table = pd.DataFrame(rows, columns=COLUMNS + NUMERIC)
    table.attrs["level"] = level
    return table.sort_values(["role", "finding"], key=lambda c: c.map(order) if
                             c.name == "finding" else c.map({PRIMARY: 0, EXPLORATORY: 1}),
                             kind="stable", ignore_index=True)


def level_of(specs: Iterable[dict | None], tables: list[pd.DataFrame]) -> float:
    """The primaries' level: 0.05, or under a sequential design (study.json's
    ``sequential``) the level of the look its replicates reached."""
    for spec in specs:
        design = (spec or {}).get("sequential")
        if design:
            n = max((int(df["replicate"].nunique()) for df in tables), default=0)
            return power.level_at(n, design["looks"], design["levels"])
    return ALPHA


def study_findings(tables: list[pd.DataFrame], specs: list[dict | None]) -> pd.DataFrame:
    """findings() as the studies registered them (study.json): their primaries, at
    their sequential design's level where they have one."""
    return findings(tables, primaries_of(specs), level_of(specs, tables))


def primaries_of(specs: Iterable[dict | None]) -> list[str]:
    """The primary findings the studies' study.json registered, together."""
    out: list[str] = []
    for spec in specs:
        for item in ((spec or {}).get("primaries") or {}).get("findings", []):
            if item not in out:
                out.append(item)
    return out


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
    where = [storage.absolute(storage.parse(s)) for s in args.studies]
    try:
        tables = [collect.load(w) for w in where]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    specs = [collect.study_spec(w) for w in where]
    table = study_findings(tables, specs)
    text = markdown(table) + "\n" + family_note(table) + "\n"
    print(text, end="")
    if args.out:
        out = storage.absolute(storage.parse(args.out))
        storage.write_text(out, "findings.md", text)
        storage.write_text(out, "findings.csv", table.to_csv(index=False))
        if not table.empty:
            fig = fit_width(findings_figure(table))
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            storage.write_bytes(out, "findings.png", buf.getvalue())
        print(f"wrote findings.md, findings.csv{', findings.png' if not table.empty else ''} "
              f"in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
