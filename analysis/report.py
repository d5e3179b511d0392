"""A study's report: figures, tables, fitted label-efficiency curves with 95%
intervals, the protocol, the command and the commit, in one HTML file.

    python -m analysis.report runs/model_size-local
    python -m analysis.report s3://bucket/studies/model_size-cifar10-gpu

Studies call ``write_report`` when they end. It writes into ``<study>/report/``:
report.html (figures embedded), each figure as PNG and PDF, and results_tidy.csv
(the table of analysis/collect.py). A partial sweep gets a report too, which lists
what is missing.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import collect, figures, replicates, summary
from analysis.findings import findings
from analysis.fit import (
    Bootstrap,
    Fit,
    FitError,
    bootstrap,
    curve,
    efficiency,
    fit,
    fit_joint,
    select,
)
from analysis.headline import headline
from scaling import storage
from scaling.storage import Location
from scaling.study import curves

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
    ceiling = float(1 - 1 / df["classes"].dropna().iloc[0]) if df["classes"].notna().any() else 1.0
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
        inside = all(lo <= x <= hi for x in need)
        out.derived.append({
            "model": model, "target top-1 (supervised, most labels)": round(100 * acc, 2),
            "labels, fine-tuned": need[0], "labels, supervised": need[1],
            "label-efficiency multiplier": efficiency(ft_fit, sup_fit, 1 - acc),
            "95% interval, fine-tuned labels": _interval(ft, REACH),
            "within measured labels": "yes" if inside else
            f"no: extrapolated beyond {lo:g}..{hi:g}"})
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
    """A label count read off a curve; inf where the curve never reaches the target."""
    return "not reached" if np.isinf(x) else f"{x:.4g}"


def _interval(f: Fit | Bootstrap, name: str) -> str:
    if isinstance(f, Bootstrap) and name in f.intervals:
        lo, hi = f.intervals[name]
        return f"[{_count(lo)}, {_count(hi)}]"
    return "n/a (one seed)"


def params_table(a: Analysis) -> pd.DataFrame:
    rows = []
    for (model, stage), f in a.fits.items():
        c = curve(f)
        for name, value in c.params.items():
            rows.append({"model": model, "stage": stage, "form": c.form, "parameter": name,
                         "value": value, "95% interval": _interval(f, name),
                         "seeds": f.seeds if isinstance(f, Bootstrap) else 1,
                         "rmse log error": round(c.rmse_log, 4)})
    return pd.DataFrame(rows)


def improvement_table(df: pd.DataFrame) -> pd.DataFrame:
    """Relative improvement over the smallest model per model, stage and label
    fraction: mean over seeds and its 95% Student-t interval (the paper's "bigger
    models gain more from pretraining with fewer labels")."""
    rows = []
    keep = df["stage"].isin(["finetune", "supervised"]) & df["relative_improvement"].notna()
    for (model, stage, lf), g in df[keep].groupby(["model", "stage", "label_fraction"],
                                                  sort=False):
        mean, lo, hi, n = replicates.effect(g["relative_improvement"].to_numpy(),
                                            list(g["runs"]))
        rows.append({"model": model, "params (M)": round(float(g["params"].iloc[0]) / 1e6, 2),
                     "stage": stage,
                     "label fraction": lf, "relative improvement %": round(100 * mean, 2),
                     "95% interval": "n/a (one replicate)" if np.isnan(lo) else
                     f"[{100 * lo:.2f}, {100 * hi:.2f}]", "replicates": n})
    return pd.DataFrame(rows)


def protocol_table(df: pd.DataFrame) -> pd.DataFrame:
    """What each stage's number means: a stage's protocol fields that are the same in
    every row, and the names of those that vary between cells (paths, fractions)."""
    rows = []
    for stage, g in df.dropna(subset=["protocol"]).groupby("stage", sort=False):
        dicts = [json.loads(p) for p in g["protocol"]]
        keys = sorted({k for d in dicts for k in d})
        same = {k: dicts[0].get(k) for k in keys
                if all(json.dumps(d.get(k)) == json.dumps(dicts[0].get(k)) for d in dicts)}
        rows.append({"stage": stage, "protocol": json.dumps(same),
                     "varies by cell": ", ".join(k for k in keys if k not in same) or "-"})
    return pd.DataFrame(rows)


Drawn = tuple[Callable[[], Figure], str]  # the figure, and its caption


def _over(df: pd.DataFrame) -> str:
    seeds = df["replicate"].nunique()
    return (f"over {seeds} replicates (error bars: one standard deviation)" if seeds > 1 else
            "one replicate: no error bars (run with --replicates 3 or more for intervals)")


def figure_set(df: pd.DataFrame, a: Analysis, history: pd.DataFrame | None = None
               ) -> dict[str, Drawn]:
    """The figures this study's data can show, each with its caption."""
    stages = set(df["stage"])
    over = _over(df)
    out: dict[str, Drawn] = {}
    if "finetune" in stages:
        out["top1_vs_params"] = (lambda: figures.top1_vs_params(df), (
            "Test top-1 after fine-tuning against encoder parameters (log scale). A line per "
            "label fraction; points are each model's mean " + over + "; squares and dashed "
            "lines: selective-kernel models; dotted lines: the pixel arm (ridge or kNN on "
            "the same labelled pixels, no network) at each fraction."))
        if df["gain_over_supervised"].notna().any():
            out["gain"] = (lambda: figures.gain_figure(df), (
                "The study's key number: test top-1 of the fine-tuned model minus that of the "
                "better baseline without pretraining on validation (the tuned supervised "
                "network or the pixel arm) on the same labels, in percentage points, against "
                "the labelled fraction. A line per model; error bars: 95% Student-t "
                "intervals of the mean over independent replicates (none with one). Above "
                "0: pretraining helped at that label budget."))
        if df["params"].nunique() > 1:
            out["relative_improvement"] = (lambda: figures.relative_improvement(df), (
                "Top-1 relative to the smallest model at the same stage, label fraction and "
                "seed, minus 1, against parameters: fine-tuned (solid) and supervised "
                "(dashed), a line per label fraction; means " + over + "."))
        if df["head_depth"].nunique() > 1 or df["ft_layer"].nunique() > 1:
            out["head_depth"] = (lambda: figures.head_depth(df), (
                "Test top-1 after fine-tuning from each projection-head layer (0: the "
                "encoder's output), a line per head depth, a panel per label fraction; "
                "means " + over + "."))
    if "distill" in stages:
        out["distillation"] = (lambda: figures.distillation(df), (
            "Test top-1 of each fine-tuned teacher and of its students distilled on "
            "unlabelled images, per teacher model and label fraction; bars are means "
            + over.replace("error bars", "black lines") + ". The axis does not start at 0; "
            "each bar is labelled with its value."))
    if df["labels"].notna().any() and stages & {"finetune", "supervised"}:
        lab = df["labels"].dropna()
        grid = np.geomspace(lab.min() / 2, lab.max() * 2, GRID)
        bands = {k: f.band(grid) for k, f in a.fits.items() if isinstance(f, Bootstrap)}
        fitted = ("Curves: the fitted form (table above), solid (supervised: dashed) over "
                  "the measured label counts and dotted where extrapolated; bands: 95% "
                  "bootstrap over seeds." if a.fits else
                  "No curves: a form is fitted only to more label counts than it has "
                  "parameters (>= 3 here).")
        out["label_efficiency"] = (lambda: figures.label_efficiency(df, a.fits, bands), (
            "Test error against labelled examples (log-log): fine-tuned (filled circles) "
            "and supervised (open squares), a colour per model, means " + over + ". "
            + fitted))
    found = findings([df])
    if not found.empty:
        out["findings"] = (lambda: figures.findings_figure(found), (
            "The paper's findings this study measures (analysis.findings): each "
            "comparison's paired effect in top-1 percentage points, the mean over "
            "replicates with its 95% Student-t interval. Verdicts from a t-test of each "
            "effect against 0, Holm-adjusted across the table: green reproduced (the "
            "paper's side of 0), red reversed, grey not resolved (the table gives the "
            "smallest effect these replicates could detect). With 2 replicates the "
            "interval is wide (t = 12.7): an effect must be large and consistent to count."))
    if history is not None and not history.empty:
        out["training_curves"] = (lambda: figures.training_curves(history), (
            "Training loss against each stage's own steps: a row per stage, a column per "
            "model, a line per distinct stage run (its label fraction, and its LR where it "
            "was one run of an LR grid chosen on validation). Pretraining: NT-Xent; "
            "fine-tuning and supervised: cross-entropy; distillation: cross-entropy to the "
            "teacher."))
    return out


def histories(df: pd.DataFrame, study_dir: Location) -> pd.DataFrame:
    """Each distinct stage run's loss curve, from the study's curves.csv (written by the
    sweep; every LR of a grid, not only the chosen one): columns stage, model, run,
    replicate, step, loss. Empty where the study has none."""
    c = curves.read(study_dir)
    c = c[c["metric"] == "loss"]
    columns = ["stage", "model", "run", "replicate", "step", "loss"]
    if c.empty or df.empty:
        return pd.DataFrame(columns=columns)
    # Where a grid's runs are there, the chosen LR's curve is one of them.
    grids = set(c.loc[c["lr"] != "", "stage_key"])
    c = c[(c["lr"] != "") | ~c["stage_key"].isin(grids)]
    meta = df.drop_duplicates(["stage", "stage_key"]).set_index(["stage", "stage_key"])
    rows = []
    for (stage, key, lr), g in c.groupby(["stage", "stage_key", "lr"], sort=False):
        if (stage, key) not in meta.index:
            continue  # a stage run of another invocation's grid
        r = meta.loc[(stage, key)]
        run = "" if stage == "pretrain" else f"{100 * float(r['label_fraction']):g}%"
        name = f"{run}, lr {lr}" if lr else (run or "pretraining")
        rows += [{"stage": stage, "model": str(r["model"]), "run": name,
                  "replicate": int(r["replicate"]), "step": int(step), "loss": float(loss)}
                 for step, loss in zip(g["step"], g["value"], strict=True)]
    return pd.DataFrame(rows, columns=columns)


def splits_note(df: pd.DataFrame) -> str:
    """Which split chose what, and which one the numbers below are on."""
    sizes = sorted({json.loads(p).get("val_size") for p in df["protocol"].dropna()} - {None})
    val = (f"{', '.join(map(str, sizes))} training images held out, class-balanced"
           if sizes else "none recorded (results from before validation splits)")
    return ("<h3>Splits</h3><p>Every accuracy in this report is top-1 on the <b>test</b> "
            "split, which chose nothing. Presets, learning rates (the supervised "
            "baseline's included) and recipes were chosen on the <b>validation</b> split "
            f"({html.escape(val)}); "
            "its numbers are the <code>val_top1</code>, <code>linear_val_top1</code> and "
            "<code>knn_val_top1</code> columns of results_tidy.csv. Label subsets, "
            "pretraining and distillation images never include a validation image.</p>")


def _readable(df: pd.DataFrame) -> pd.DataFrame:
    """Label fractions as the text says them (0.1%, not 0.001)."""
    out = df.copy()
    for col in ("label fraction", "label_fraction"):
        if col in out:
            out[col] = [v if not isinstance(v, float) or np.isnan(v) else f"{100 * v:g}%"
                        for v in out[col]]
    return out


def _styled(df: pd.DataFrame, caption: str) -> str:
    """A table as HTML (pandas Styler) with its caption."""
    styler = _readable(df).style.hide(axis="index").set_caption(html.escape(caption)).format(
        lambda v: _count(v) if isinstance(v, float) else v, na_rep="-").set_table_attributes(
        'class="t"')
    return str(styler.to_html())


def _table_html(df: pd.DataFrame) -> str:
    return _readable(df).to_html(index=False, border=0, classes="t", float_format=_count,
                                 na_rep="-")


def write_report(study_dir: Location) -> Location:
    """Write the report into ``<study_dir>/report/``; returns report.html's location."""
    spec = collect.study_spec(study_dir) or {}
    df = collect.load(study_dir, spec or None)
    missing = collect.missing(spec or None, df)
    a = analyse(df)
    out = storage.join(study_dir, "report")
    # The run keys as text a spreadsheet reads: sorted, ';'-separated.
    flat = df.assign(runs=[";".join(sorted(r)) for r in df["runs"]])
    storage.write_text(out, "results_tidy.csv", flat.to_csv(index=False))
    shown = []
    for name, (draw, caption) in figure_set(df, a, histories(df, study_dir)).items():
        fig = draw()
        for fmt in ("png", "pdf"):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=130, bbox_inches="tight")
            storage.write_bytes(out, f"{name}.{fmt}", buf.getvalue())
            if fmt == "png":
                shown.append((name, base64.b64encode(buf.getvalue()).decode(), caption))
        plt.close(fig)
    study = str(df["study"].iloc[0])
    seeds = df["replicate"].nunique()
    spread = f"mean ± standard deviation over {seeds} replicates" if seeds > 1 else "one replicate"
    found = findings([df])
    parts = [f"<h1>{html.escape(study)}</h1>",
             _summary_box(df, spec, missing, headline(df), found)]
    if "finetune" in set(df["stage"]):
        distilled = ", self-distilled (the teacher's architecture)" if (
            "distill" in set(df["stage"])) else ""
        parts += ["<h2>Table 1: top-1 by model</h2>", _styled(figures.table1(df), (
            f"Test top-1 (%), {spread}: fine-tuned and supervised (same labels) at every "
            f"label fraction{distilled}, and the linear and kNN probes of the pretrained "
            "encoder (fitted on every training label). Parameters: the encoder's, in "
            "millions. The raw-pixels row has no network: in the supervised columns the "
            "pixel arm (ridge or kNN on the same labelled pixels, chosen on validation); "
            "under linear and kNN the same probes on the pixels."))]
    parts.append("<h2>Figures</h2>")
    parts += [f'<figure><img alt="{n}" src="data:image/png;base64,{b}">'
              f"<figcaption><b>{n}.</b> {html.escape(c)} (<a href='{n}.pdf'>PDF</a>)"
              "</figcaption></figure>" for n, b, c in shown]
    parts += _appendix(df, spec, missing, a, found)
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(study)} report</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    storage.write_text(out, "report.html", page)
    return storage.join(out, "report.html")


def _summary_box(df: pd.DataFrame, spec: dict, missing: list[str], top: str,
                 found: pd.DataFrame) -> str:
    """The report's first screen: data and budgets, the headline, the findings, the
    warnings, and where the numbers came from."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary.data_and_budgets(df))
    parts = [f"<div class='summary'><h2>Summary</h2><ul>{items}</ul>"]
    if top:
        parts.append(f"<pre>{html.escape(top)}</pre>")
    lines = summary.findings_lines(found)
    if lines:
        parts.append("<h3>The paper's findings at this scale (Holm-adjusted; details in the "
                     "appendix)</h3><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines)
                     + "</ul>")
    warned = summary.warnings(df, missing)
    if warned:
        parts.append("<h3>Warnings</h3><ul class='warn'>" + "".join(
            f"<li>{html.escape(w)}</li>" for w in warned) + "</ul>")
    commits = ", ".join(sorted(set(df["git_commit"].astype(str))))
    parts.append(f"<p class='small'>{df['cell'].nunique()} cells, {len(df)} (cell, stage) rows; "
                 f"command <code>{html.escape(spec.get('command', 'unknown (no study.json)'))}"
                 f"</code>; commit <code>{html.escape(commits)}</code>; written "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Every accuracy is top-1 on the test "
                 "split, which chose nothing.</p></div>")
    return "".join(parts)


def _appendix(df: pd.DataFrame, spec: dict, missing: list[str], a: Analysis,
              found: pd.DataFrame) -> list[str]:
    """Every table behind the summary and the figures, and the fits' parameters."""
    parts = ["<h2>Appendix</h2>", splits_note(df)]
    if missing:
        parts.append(f"<h3>Missing ({len(missing)} stages: a partial sweep)</h3><ul>"
                     + "".join(f"<li>{html.escape(m)}</li>" for m in missing) + "</ul>")
    else:
        parts.append("<p>Every stage of the grid has a result.</p>" if spec else
                     "<p>(No study.json: the grid, and so what is missing, is unknown.)</p>")
    if not found.empty:
        parts += ["<h3>Findings</h3>", _table_html(found.drop(columns=["_lo", "_hi"]))]
    if "finetune" in set(df["stage"]):
        gains = [figures.gain(df, b).assign(against=figures.BASELINES[b][0])
                 for b in figures.BASELINES if df[f"gain_over_{b}"].notna().any()]
        g = pd.concat(gains, ignore_index=True) if gains else pd.DataFrame()
        if not g.empty:
            g = g.assign(params=(g["params"] / 1e6).round(2)).rename(
                columns={"params": "params (M)"})
            parts += ["<h3>What pretraining buys: fine-tuned minus each baseline</h3>",
                      _styled(g.drop(columns=["_lo", "_hi"]), (
                          "Top-1 of the fine-tuned model minus a baseline without "
                          "pretraining on the same labels: the tuned supervised network, the "
                          "pixel arm (ridge or kNN on the labelled pixels), and the better of "
                          "the two on validation; percentage points; 95% Student-t interval "
                          "of the mean over independent replicates (values sharing a stage "
                          "run count once)."))]
    if "distill" in set(df["stage"]):
        parts += ["<h3>Distilled student minus teacher</h3>", _styled(figures.distill_gap(df), (
            "Test top-1 of the distilled student minus its fine-tuned teacher, percentage "
            "points, per unlabelled set; 95% Student-t interval of the mean over seeds."))]
    if df["params"].nunique() > 1:
        parts += ["<h3>Relative improvement over the smallest model</h3>",
                  _table_html(improvement_table(df))]
    parts.append("<h3>Label-efficiency curves</h3>")
    if a.fits:
        chosen = pd.DataFrame([{"model": k[0], "stage": k[1], "form": v}
                               for k, v in a.chosen.items()])
        parts += [_table_html(chosen), _table_html(params_table(a))]
    if a.derived:
        parts += ["<h3>Labels needed and label efficiency</h3>",
                  "<p>The <b>label-efficiency multiplier</b> is how many times more labels "
                  "supervised training needs than fine-tuning the pretrained model to reach "
                  "the same test error, here the error of the supervised baseline trained "
                  "on the most labels: labels(supervised) / labels(fine-tuned), both read "
                  "off the fitted curves. Above 1, pretraining saves labels. Values read "
                  "outside the measured label counts are extrapolations and are marked.</p>",
                  _table_html(pd.DataFrame(a.derived))]
    parts.append(f"<p>Joint fit over label counts and parameters (fine-tuned): "
                 f"{html.escape(a.joint)}</p>")
    if a.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in a.notes) + "</ul>")
    parts += ["<h3>Protocol</h3>", _table_html(protocol_table(df)),
              "<p>Every row: <a href='results_tidy.csv'>results_tidy.csv</a> "
              "(columns: docs/analysis.md).</p>"]
    return parts


CSS = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
       "table.t{border-collapse:collapse;margin:1em 0;font-size:13px}"
       "table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}"
       "img{max-width:100%}figure{margin:1.5em 0}"
       "pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap;font-size:12px}"
       "caption{caption-side:bottom;text-align:left;font-size:12px;color:#555;padding:4px}"
       "figcaption{font-size:13px;color:#444}td{white-space:nowrap}"
       ".summary{background:#f3f6fa;border:1px solid #c9d6e3;padding:.2em 1em 1em}"
       ".warn li{color:#8a4b00}.small{font-size:12px;color:#555}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study's storage: runs/model_size-local or an s3:// URI")
    args = p.parse_args(argv)
    try:
        print(write_report(storage.absolute(storage.parse(args.study))))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
