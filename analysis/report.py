"""A study's report: figures, tables, fitted label-efficiency curves with 95%
intervals, the protocol, the command and the commit, in one HTML file.

    python -m analysis.report runs/model_size-local
    python -m analysis.report s3://bucket/studies/model_size-cifar10-gpu
    python -m analysis.report runs/model_size-local runs/short-ft   # two: a comparison
    python -m analysis.report reference/simclrv2_table1.csv --fit-below 200  # a paper's

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
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import collect, figures, published, summary
from analysis.curves import Analysis, _count, analyse, number
from analysis.findings import study_findings
from analysis.headline import bottom_line, headline
from analysis.tables import (
    distill_gap,
    gains_table,
    histories,
    improvement_table,
    markdown_table,
    params_table,
    protocol_table,
    table1,
)
from analysis.validation import Validation, candidates_table, held_table, summary_lines, validate
from analysis.verdicts import family_note
from scaling import storage
from scaling.storage import Location


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
        lambda v: number(v) if isinstance(v, float) else v, na_rep="-").set_table_attributes(
        'class="t"')
    return str(styler.to_html())


def fits_table(chosen: dict[tuple[str, str], str]) -> tuple[pd.DataFrame, list[str]]:
    """The form chosen per curve, with why as a footnote number: the reasons are long
    and shared by many curves, so each is written once, below the table."""
    notes: list[str] = []
    rows = []
    for (model, stage), text in chosen.items():
        form, _, why = text.partition("; ")
        if why not in notes:
            notes.append(why)
        rows.append({"model": model, "stage": stage, "form": form,
                     "why (note)": notes.index(why) + 1})
    return pd.DataFrame(rows), notes


def protocol_html(table: pd.DataFrame) -> str:
    """Each stage's protocol as a key / value list (a JSON cell ran off the page)."""
    parts = []
    for _, r in table.iterrows():
        fields = json.loads(r["protocol"])
        items = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_value(v))}</td></tr>"
                        for k, v in fields.items())
        parts.append(f"<h4>{html.escape(str(r['stage']))}</h4><table class='t kv'>{items}"
                     f"<tr><th>varies by cell</th><td>{html.escape(str(r['varies by cell']))}"
                     "</td></tr></table>")
    return "".join(parts)


def _value(v: object) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(", ", ": "))


def _derived_table(derived: list[dict]) -> pd.DataFrame:
    """Labels needed as whole counts, the multiplier to 2 decimals: one precision a
    column."""
    t = pd.DataFrame(derived)
    for col in ("labels, fine-tuned", "labels, supervised"):
        t[col] = t[col].map(_count)
    t["label-efficiency multiplier"] = t["label-efficiency multiplier"].map(
        lambda x: "not reached" if not np.isfinite(x) else f"{x:.2f}")
    return t


def _table_html(df: pd.DataFrame) -> str:
    return _readable(df).to_html(index=False, border=0, classes="t", float_format=number,
                                 na_rep="-")


def write_report(study_dir: Location, below_m: float | None = None) -> Location:
    """Write the report into ``<study_dir>/report/``; returns report.html's location."""
    spec = collect.study_spec(study_dir) or {}
    df = collect.load(study_dir, spec or None)
    return render(df, spec, storage.join(study_dir, "report"), histories(df, study_dir),
                  collect.invocations(study_dir), below_m)


def write_table_report(csv: str, out: Location, below_m: float | None = None) -> Location:
    """A published table's report (analysis/published.py) into ``out``."""
    return render(published.load(csv), {}, out, pd.DataFrame(), [], below_m)


def render(df: pd.DataFrame, spec: dict, out: Location, history: pd.DataFrame,
           invocations: list[dict], below_m: float | None = None) -> Location:
    """The report of the tidy table ``df`` (study.json ``spec``; {} for none)."""
    missing = collect.missing(spec or None, df)
    a = analyse(df)
    checked = validate(df, below_m)
    # The run keys as text a spreadsheet reads: sorted, ';'-separated.
    flat = df.assign(runs=[";".join(sorted(r)) for r in df["runs"]])
    storage.write_text(out, "results_tidy.csv", flat.to_csv(index=False))
    shown = []
    found = study_findings([df], [spec])
    exported = write_exports(out, {"table1": table1(df), "gains": gains_table(df)})
    drawn = figures.figure_set(df, a, history, found, checked.held if len(checked.held) else None)
    for name, (draw, caption) in drawn.items():
        fig = figures.fit_width(draw())
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
    bottom = bottom_line(df, found, invocations, summary.data_and_budgets(df))
    parts = [f"<h1>{html.escape(study)}</h1>",
             _summary_box(df, spec, missing,
                          headline(df, found, ("F1",) if bottom else ("P", "F1")), found, bottom)]
    if "finetune" in set(df["stage"]):
        distilled = ", self-distilled (the teacher's architecture)" if (
            "distill" in set(df["stage"])) else ""
        links = " ".join(f"<a href='table1.{x}'>{x.upper()}</a>" for x in exported["table1"])
        parts += [f"<h2>Table 1: top-1 by model</h2><p class='small'>Also as {links}.</p>",
                  _styled(table1(df), (
            f"Test top-1 (%), {spread}: fine-tuned and supervised (same labels) at every "
            f"label fraction{distilled}, and the linear and kNN probes of the pretrained "
            "encoder (fitted on every training label). Parameters: the encoder's, in "
            "millions. The raw-pixels row has no network: under 'pixel arm' ridge or kNN on "
            "the same labelled pixels (chosen on validation); under linear and kNN the "
            "same probes on the pixels."))]
    parts.append("<h2>Figures</h2>")
    parts += [f'<figure><img alt="{n}" src="data:image/png;base64,{b}">'
              f"<figcaption><b>{n}.</b> {html.escape(c)} (<a href='{n}.pdf'>PDF</a>)"
              "</figcaption></figure>" for n, b, c in shown]
    parts += _laws_section(checked)
    parts += _appendix(df, spec, missing, a, found, checked)
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(study)} report</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    storage.write_text(out, "report.html", page)
    return storage.join(out, "report.html")


EXPORTS = ("csv", "md", "tex")


def write_exports(out: Location, tables: dict[str, pd.DataFrame]) -> dict[str, list[str]]:
    """Each non-empty table beside the report as CSV, Markdown and LaTeX (for a paper's
    source); returns the formats written per table."""
    written: dict[str, list[str]] = {}
    for name, t in tables.items():
        if t.empty:
            written[name] = []
            continue
        storage.write_text(out, f"{name}.csv", t.to_csv(index=False))
        storage.write_text(out, f"{name}.md", markdown_table(t))
        storage.write_text(out, f"{name}.tex", t.to_latex(index=False, escape=True))
        written[name] = list(EXPORTS)
    return written


def _summary_box(df: pd.DataFrame, spec: dict, missing: list[str], top: str,
                 found: pd.DataFrame, bottom: str = "") -> str:
    """The report's first screen: the bottom line (what pretraining buys at every
    label count with its verdict, the data and budgets, the machine and the time),
    the headline, the findings, the warnings, and where the numbers came from."""
    if bottom:
        parts = [f"<div class='summary'><h2>Summary</h2><pre class='bottom'>"
                 f"{html.escape(bottom)}</pre>"]
    else:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in summary.data_and_budgets(df))
        parts = [f"<div class='summary'><h2>Summary</h2><ul>{items}</ul>"]
    if top:
        parts.append(f"<pre>{html.escape(top)}</pre>")
    lines = summary.findings_lines(found)
    if lines:
        parts.append("<h3>The paper's findings at this scale (details in the appendix)</h3>"
                     f"<p class='small'>{html.escape(family_note(found))}.</p><ul>"
                     + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
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


def _laws_section(v: Validation) -> list[str]:
    """Which scaling law predicts a model it was not fitted on: chosen by held-out
    error, never by in-sample fit (which stays in the appendix)."""
    parts = ["<h2>Which law predicts an untrained model</h2>",
             "<p>Each law is fitted to the mean fine-tuned error per model and label count "
             "with one model held out, then predicts it; the law with the smallest mean "
             "|predicted - measured| top-1 is chosen (analysis/laws.py). The figure "
             "'predicted_vs_measured' shows each model predicted by a law fitted without "
             "it (the table below says which law, and whether it was chosen without it "
             "too).</p><ul>"
             + "".join(f"<li>{html.escape(x)}</li>" for x in summary_lines(v) + v.notes)
             + "</ul>"]
    if v.choice is not None:
        parts += [_table_html(candidates_table(v)), _table_html(held_table(v))]
        if v.choice.skipped:
            parts.append("<p class='small'>Not checked out of sample: " + html.escape(
                "; ".join(f"{k} ({w})" for k, w in v.choice.skipped.items())) + "</p>")
    return parts


def _appendix(df: pd.DataFrame, spec: dict, missing: list[str], a: Analysis,
              found: pd.DataFrame, checked: Validation | None = None) -> list[str]:
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
        g = gains_table(df)
        if not g.empty:
            parts += ["<h3>What pretraining buys: fine-tuned minus each baseline</h3>",
                      _styled(g, (
                          "Top-1 of the fine-tuned model minus a baseline without "
                          "pretraining on the same labels: the tuned supervised network, the "
                          "pixel arm (ridge or kNN on the labelled pixels), and the better of "
                          "the two on validation; percentage points; 95% Student-t interval "
                          "of the mean over independent replicates (values sharing a stage "
                          "run count once)."))]
    if "distill" in set(df["stage"]):
        parts += ["<h3>Distilled student minus teacher</h3>", _styled(distill_gap(df), (
            "Test top-1 of the distilled student minus its fine-tuned teacher, percentage "
            "points, per unlabelled set; 95% Student-t interval of the mean over seeds."))]
    if df["params"].nunique() > 1:
        parts += ["<h3>Relative improvement over the smallest model</h3>",
                  _table_html(improvement_table(df))]
    parts.append("<h3>Label-efficiency curves</h3>")
    if a.fits:
        chosen, why = fits_table(a.chosen)
        parts += [_table_html(chosen), "<ol class='small'>" + "".join(
            f"<li>{html.escape(w)}</li>" for w in why) + "</ol>",
            _table_html(params_table(a))]
    if a.derived:
        parts += ["<h3>Labels needed and label efficiency</h3>",
                  "<p>The <b>label-efficiency multiplier</b> is how many times more labels "
                  "supervised training needs than fine-tuning the pretrained model to reach "
                  "the same test error, here the error of the supervised baseline trained "
                  "on the most labels: labels(supervised) / labels(fine-tuned), both read "
                  "off the fitted curves. Above 1, pretraining saves labels. Values read "
                  "outside the measured label counts are extrapolations and are marked.</p>",
                  _table_html(_derived_table(a.derived))]
    parts.append(f"<p>Joint fit over label counts and parameters (fine-tuned): "
                 f"{html.escape(a.joint)}</p>")
    if checked is not None and checked.in_sample:
        parts.append("<p>In-sample fit of each law on every model (rmse of log error; it "
                     "chose nothing): " + html.escape(", ".join(
                         f"{k} {v:.4f}" for k, v in checked.in_sample.items())) + "</p>")
    if a.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in a.notes) + "</ul>")
    parts += ["<h3>Protocol</h3>", protocol_html(protocol_table(df)),
              "<p>Every row: <a href='results_tidy.csv'>results_tidy.csv</a> "
              "(columns: docs/analysis.md).</p>"]
    return parts


CSS = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
       "table.t{border-collapse:collapse;margin:1em 0;font-size:13px}"
       "table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}"
       "img{max-width:100%}figure{margin:1.5em 0}"
       "pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap;font-size:12px}"
       "caption{caption-side:bottom;text-align:left;font-size:12px;color:#555;padding:4px}"
       "figcaption{font-size:13px;color:#444}"
       # Tables fit the page: cells wrap (long names, protocol values) instead of
       # running off it; numbers stay on one line where they fit.
       "table.t{max-width:100%}table.t td,table.t th{overflow-wrap:anywhere}"
       "table.kv th{text-align:left;vertical-align:top;white-space:nowrap}"
       "table.kv td{text-align:left}"
       ".summary{background:#f3f6fa;border:1px solid #c9d6e3;padding:.2em 1em 1em}"
       ".warn li{color:#8a4b00}.small{font-size:12px;color:#555}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="+", help="a study's storage: runs/model_size-local or an "
                   "s3:// URI; two: the second against the first (analysis/compare.py); or a "
                   "published table's CSV (analysis/published.py)")
    p.add_argument("--out", default=None, help="a published table's report folder (default: "
                   "runs/<the CSV's name>/report)")
    p.add_argument("--fit-below", type=float, default=None, metavar="M",
                   help="the forward prediction fits on models under M million parameters "
                        "(default: every model but the biggest)")
    args = p.parse_args(argv)
    if len(args.study) > 2:
        print(f"error: study: {len(args.study)} given; allowed: one (its report) or two (a "
              "comparison)", file=sys.stderr)
        return 2
    if args.fit_below is not None and not args.fit_below > 0:
        print(f"error: --fit-below: {args.fit_below}; allowed: millions of parameters > 0",
              file=sys.stderr)
        return 2
    try:
        if len(args.study) == 1 and published.is_published(args.study[0]):
            out = args.out or str(Path("runs") / Path(args.study[0]).stem / "report")
            print(write_table_report(args.study[0], storage.absolute(storage.parse(out)),
                                     args.fit_below))
            return 0
        where = [storage.absolute(storage.parse(s)) for s in args.study]
        if len(where) == 2:
            from analysis.compare import write_comparison

            print(write_comparison(*where))
        else:
            print(write_report(where[0], args.fit_below))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
