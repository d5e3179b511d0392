"""analysis/: fits recover known curves from noisy synthetic data within their
bootstrap intervals, model selection finds the true form, bad inputs get clear
messages, every figure renders with its axes and legends, and the report is a
page Chromium renders."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from layout import legend_on_data, overlapping_texts

from analysis import collect, curves, figures, report, tables
from analysis.curves import FORMS, FitError, bootstrap, efficiency, fit, fit_joint, select
from analysis.findings import findings

matplotlib.use("Agg")
CEILING = 0.9  # 10 classes
TRUTH = {"power": [3.0, 0.35], "saturating": [4.0, 0.5, 0.08], "envelope": [40.0, 0.6, 0.05]}
COUNTS = np.geomspace(60, 60000, 8)


def _noisy(form: str, seeds: int = 6, noise: float = 0.03, rng: int = 0):
    """Errors on a true curve times log-normal noise, per seed."""
    g = np.random.default_rng(rng)
    n = np.tile(COUNTS, seeds)
    s = np.repeat(np.arange(seeds), COUNTS.size)
    true = FORMS[form].curve(n, np.array(TRUTH[form]), CEILING)
    return n, true * np.exp(g.normal(0, noise, n.size)), s


@pytest.mark.parametrize("form", list(FORMS))
def test_bootstrap_intervals_cover_the_true_parameters(form):
    n, err, seeds = _noisy(form)
    b = bootstrap(n, err, seeds, form, CEILING, resamples=300)
    for name, truth in zip(FORMS[form].params, TRUTH[form], strict=True):
        lo, hi = b.intervals[name]
        print(f"{form} {name}: true {truth}, fitted {b.fit.params[name]:.4g}, "
              f"95% [{lo:.4g}, {hi:.4g}]")
        assert lo <= truth <= hi, (name, truth, lo, hi)
        assert hi - lo < 0.5 * abs(truth) + 0.02  # and the interval says something
    assert b.seeds == 6 and len(b.samples) > 250


@pytest.mark.parametrize("form", list(FORMS))
def test_selection_by_extrapolation_finds_the_true_form(form):
    n, err, _ = _noisy(form, noise=0.005, rng=1)
    sel = select(n, err, CEILING)
    assert sel.best == form, sel.scores
    assert sel.held_out == COUNTS.max()


def test_labels_for_inverts_the_curve_and_the_efficiency_multiplier_is_closed_form():
    n = COUNTS[2:]
    ft = fit(n, 1.5 * n**-0.35, "power")
    sup = fit(n, 3.0 * n**-0.35, "power")
    target = 0.1
    assert ft.labels_for(target) == pytest.approx((1.5 / target) ** (1 / 0.35), rel=1e-4)
    # Same exponent: supervised needs (3/1.5)^(1/b) times the labels at any error.
    assert efficiency(ft, sup, target) == pytest.approx(2 ** (1 / 0.35), rel=1e-3)
    sat = fit(COUNTS, 4.0 * COUNTS**-0.5 + 0.08, "saturating", CEILING)
    assert sat.labels_for(0.05) == float("inf")  # below the floor: never
    assert sat.asymptote() == pytest.approx(0.08, rel=1e-3)


def test_joint_fit_recovers_a_known_surface():
    n, p = np.meshgrid(COUNTS, [1e4, 1e5, 1e6, 1e7])
    err = 2.0 * n**-0.4 + 5.0 * p**-0.3 + 0.03
    j = fit_joint(n.ravel(), p.ravel(), err.ravel(), CEILING)
    assert j.rmse_log < 1e-3
    assert np.allclose(j.predict(n, p), err, rtol=1e-2)


def test_degenerate_inputs_get_clear_messages():
    with pytest.raises(FitError, match="1 distinct label count"):
        fit([100.0], [0.3], "power")
    # As many points as parameters is an exact fit that says nothing: refused.
    with pytest.raises(FitError, match="more points than parameters"):
        fit([100.0, 1000.0], [0.3, 0.2], "power")
    with pytest.raises(FitError, match="more points than parameters"):
        fit(COUNTS[:3], [0.3, 0.2, 0.15], "saturating")
    with pytest.raises(FitError, match="more than 5"):  # 5 parameters, 4 points
        fit_joint([100, 1000, 100, 1000], [1e4, 1e4, 1e5, 1e5], [0.3, 0.2, 0.25, 0.15])
    with pytest.raises(FitError, match="every label count: no curve"):
        fit(COUNTS, np.full(COUNTS.size, 0.3), "power")
    with pytest.raises(FitError, match="all 3 points are NaN"):
        fit([1.0, 2.0, 3.0], [np.nan] * 3, "power")
    with pytest.raises(FitError, match=r"errors in \(0, 1\]"):
        fit(COUNTS[:3], [0.2, 1.5, 0.1], "power")
    with pytest.raises(FitError, match="allowed: power, saturating, envelope"):
        fit(COUNTS, COUNTS**-0.3, "cubic")
    with pytest.raises(FitError, match="one label count only"):
        select([100.0, 100.0], [0.3, 0.31])
    n, err, seeds = _noisy("power", seeds=1)
    with pytest.raises(FitError, match="1 seed.*--repeats 2"):
        bootstrap(n, err, seeds, "power")
    # NaN rows (unfinished stages) are dropped, not fitted as zeros.
    with_nan = np.append(3.0 * COUNTS**-0.35, np.nan)
    f = fit(np.append(COUNTS, 500.0), with_nan, "power")
    assert f.points == COUNTS.size and f.params["b"] == pytest.approx(0.35, rel=1e-3)


# --- synthetic study tables ------------------------------------------------------------

MODELS = [(18, 0.0625, 0.0, 44_000), (18, 0.125, 0.0, 176_000), (34, 0.125, 0.0625, 340_000)]
FRACTIONS = [0.01, 0.05, 0.1, 0.5, 1.0]


def synthetic_rows(seeds=(0, 1, 2), fractions=FRACTIONS, head_depths=(3,), students=False):
    """A study's rows as the sweep writes them: bigger models and fine-tuning are
    better, more so with few labels."""
    g = np.random.default_rng(0)
    rows = []
    for depth, width, sk, params in MODELS:
        for hd in head_depths:
            for ft_layer in range(min(hd, 2)):
                for lf in fractions:
                    for seed in seeds:
                        cell = (f"depth={depth},width={width},sk={sk},head_depth={hd},"
                                f"ft_layer={ft_layer},label_fraction={lf},seed={seed}")
                        n = 60000 * lf
                        size = (params / 44_000) ** -0.15
                        ft_err = min(0.85, size * (2.5 * n**-0.35 + 0.05)) * np.exp(
                            g.normal(0, 0.02))
                        sup_err = min(0.85, size * (6.0 * n**-0.4 + 0.06)) * np.exp(
                            g.normal(0, 0.02))
                        # Independent replicates: seed s also draws labelled subset s.
                        px_err = min(0.85, 4.0 * n**-0.3 + 0.1)
                        base = {"study": "synthetic", "cell": cell, "status": "executed",
                                "git_commit": "abc", "seed": seed, "model.depth": depth,
                                "finetune.subset_seed": seed,
                                "model.width": width, "model.sk_ratio": sk,
                                "head.num_layers": hd, "finetune.head_layer": ft_layer,
                                "finetune.label_fraction": lf, "data.name": "fashion-mnist",
                                "params": params, "protocol": json.dumps({"probe": "test top-1"})}
                        rows += [
                            {**base, "stage": "pretrain", "stage_key": f"p{params}{hd}{seed}",
                             "linear_top1": 0.7 + 0.02 * np.log(size ** -1 + 1),
                             "knn_top1": 0.7},
                            {**base, "stage": "finetune", "stage_key": f"f{cell}",
                             "top1": 1 - ft_err, "labelled_examples": n},
                            {**base, "stage": "distill", "stage_key": f"d{cell}",
                             "top1": 1 - ft_err * 0.97, "teacher_top1": 1 - ft_err,
                             "labelled_examples": None,
                             **({"distill.student.depth": 18, "distill.student.width": 0.0625,
                                 "distill.student.sk_ratio": 0.0} if students else {})},
                            {**base, "stage": "supervised", "stage_key": f"s{cell}",
                             "top1": 1 - sup_err, "val_top1": 1 - sup_err,
                             "labelled_examples": n},
                            # One pixel-arm run per (fraction, subset), whatever the model.
                            {**base, "stage": "pixels", "stage_key": f"x{lf}-{seed}",
                             "top1": 1 - px_err, "val_top1": 1 - px_err,
                             "labelled_examples": n},
                        ]
    return rows


def _table(rows) -> pd.DataFrame:
    from scaling.study.results import table

    return collect.tidy(table(rows))


def test_tidy_adds_the_derived_columns():
    df = _table(synthetic_rows(seeds=(0,), fractions=[0.1]))
    assert set(collect.DERIVED) <= set(df.columns)
    ft = df[(df["stage"] == "finetune") & (df["ft_layer"] == 0)].set_index("params")
    small = ft.loc[44_000, "top1"]
    for _, row in ft.iterrows():
        assert row["relative_improvement"] == pytest.approx(row["top1"] / small - 1)
        assert row["gain_over_supervised"] == pytest.approx(row["top1"] - row["supervised_top1"])
        assert row["error"] == pytest.approx(1 - row["top1"])
        assert row["labels"] == 6000 and row["label_fraction"] == 0.1
    assert list(df.drop_duplicates("model")["model"]) == ["R18 1/16x", "R18 1/8x",
                                                           "R34 1/8x +SK", collect.PIXELS]
    px = df[df["stage"] == "pixels"]
    assert px["relative_improvement"].isna().all() and px["gain_over_supervised"].isna().all()
    assert (ft["gain_over_pixels"] == ft["top1"] - ft["pixels_top1"]).all()
    # The better baseline on validation (synthetic: validation = test), then its test top-1.
    best = np.maximum(ft["supervised_top1"], ft["pixels_top1"])
    assert np.allclose(ft["gain_over_best"], ft["top1"] - best)
    # Fine-tuning rests on itself and pretraining, and on its draws: seed and subset.
    assert ft["runs"].map(len).eq(4).all()
    assert all({"seed:0", "subset:0"} <= r for r in ft["runs"])
    assert df.loc[df["stage"] == "pretrain", "label_fraction"].isna().all()
    assert df.loc[df["stage"] == "distill", "student"].eq("self").all()
    with pytest.raises(ValueError, match="empty"):
        collect.tidy(pd.DataFrame())


def _labels_and_legend(fig) -> None:
    """Axis labels (small multiples: on the outer panels), data in every panel; a legend; no text
    overlaps another and no legend covers data (tests/layout.py)."""
    shown = [ax for ax in fig.axes if ax.axison and ax.get_visible()]
    for ax in shown:
        assert ax.lines or ax.containers or ax.collections
    assert any(ax.get_xlabel() for ax in shown) and any(ax.get_ylabel() for ax in shown)
    assert fig.legends or any(ax.get_legend() is not None and ax.get_legend().get_texts()
                              for ax in shown)
    assert overlapping_texts(fig) == [], overlapping_texts(fig)
    assert legend_on_data(fig) == []


def test_every_figure_renders_with_axes_labels_and_legends(tmp_path):
    df = _table(synthetic_rows(head_depths=(2, 3), students=True))
    a = curves.analyse(df)
    grid = np.geomspace(df["labels"].min() / 2, df["labels"].max() * 2, curves.GRID)
    bands = {k: f.band(grid) for k, f in a.fits.items() if hasattr(f, "band")}
    made = {
        "top1_vs_params": figures.top1_vs_params(df),
        "relative_improvement": figures.relative_improvement(df),
        "head_depth": figures.head_depth(df),
        "distillation": figures.distillation(df),
        "label_efficiency": figures.label_efficiency(df, a.fits, bands),
        "gain": figures.gain_figure(df),
        "findings": figures.findings_figure(findings([df])),
        "training_curves": figures.training_curves(pd.DataFrame(
            [{"stage": st, "model": m, "run": f"{lf}%, lr {lr}", "replicate": r,
              "step": k, "loss": 2.0 / k + r * 0.01}
             for st in ("pretrain", "finetune") for m in ("R18 1/16x", "R18 1/8x")
             for lf in (1, 10) for lr in (0.1, 0.4) for r in (0, 1) for k in range(1, 30)])),
    }
    for name, fig in made.items():
        _labels_and_legend(fig)
        if name in ("findings", "training_curves"):
            continue
        if name != "gain":  # accuracies and errors in percent
            assert "%" in fig.axes[0].yaxis.get_major_formatter()(0.5, 0), name
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
    assert len(made["head_depth"].axes) == len(FRACTIONS)  # a panel per label fraction
    assert len(made["label_efficiency"].axes[0].collections) >= 3  # bands drawn
    # Extrapolated parts of the curves are dotted; the measured range is not.
    styles = {line.get_linestyle() for line in made["label_efficiency"].axes[0].lines}
    assert {"-", ":"} <= styles
    # Points are named by their model.
    names = {t.get_text() for t in made["top1_vs_params"].axes[0].texts}
    assert {"R18 1/16x", "R18 1/8x", "R34 1/8x +SK"} <= names
    # Distillation bars: values written on them, the axis not from 0.
    dist = made["distillation"].axes[0]
    assert dist.texts and dist.get_ylim()[0] > 0
    t = tables.table1(df)
    assert list(t.columns[:2]) == ["model", "params (M)"] and len(t) == len(MODELS) + 1
    assert not {"depth", "width", "sk", "params"} & set(t.columns)  # the name says them
    sizes = [float(p) for p in t["params (M)"].iloc[:-1]]
    assert sizes == sorted(sizes) and all(p > 0 for p in sizes)
    assert t["model"].iloc[-1] == tables.PIXELS_ROW  # the pixel arm, last
    for lf in ("1%", "10%", "100%"):
        assert {f"fine-tune {lf}", f"supervised {lf}", f"distilled {lf}"} <= set(t.columns)
    assert "linear" in t and "kNN" in t
    small = df[(df["model"] == "R18 1/16x") & (df["stage"] == "finetune")
               & (df["label_fraction"] == 0.01)]["top1"]
    assert t.loc[0, "fine-tune 1%"] == f"{100 * small.mean():.1f} ± {100 * small.std():.1f}"


def _write_study(tmp_path: Path, rows, drop_cell: str | None = None) -> Path:
    from scaling.study.results import write_cell

    study = tmp_path / "synthetic"
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    for cell in cells:
        if cell != drop_cell:
            write_cell(study, cell, f"key-{cell}", [r for r in rows if r["cell"] == cell])
    (study / "study.json").write_text(json.dumps({
        "study": "synthetic", "cells": cells, "keys": [f"key-{c}" for c in cells],
        "stages": ["pretrain", "finetune", "distill", "supervised", "pixels"],
        "command": "python studies/model_size.py --repeats 3", "git_commit": "abc"}))
    return study


def test_report_on_a_partial_sweep_and_chromium_renders_it(tmp_path):
    rows = synthetic_rows(seeds=(0, 1, 2))
    gone = rows[-1]["cell"]
    study = _write_study(tmp_path, rows, drop_cell=gone)
    from scaling.study.results import write_cell

    # A cell of an earlier grid in the same storage is not part of this study.
    write_cell(study, "an-earlier-grid", "key-x", [{**rows[1], "cell": "an-earlier-grid"}])
    path = Path(report.write_report(study))
    page = path.read_text()
    out = study / "report"
    for name in ("top1_vs_params", "gain", "relative_improvement", "head_depth",
                 "distillation", "label_efficiency", "predicted_vs_measured", "findings"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").exists()
        assert f'alt="{name}"' in page
    # Every figure has a caption saying what it shows and over how many seeds; tables
    # are HTML tables, not images.
    assert page.count("<figcaption>") == 8 and page.count("over 3 replicates") >= 4
    assert not (out / "table1.png").exists() and "Table 1: top-1 by model" in page
    assert "<caption>" in page and "± " in page and "fine-tuned minus each baseline" in page
    assert "The <b>label-efficiency multiplier</b> is" in page
    assert (out / "results_tidy.csv").exists()
    # Table 1 and the gains table beside it, as CSV, Markdown and LaTeX, with the
    # same cells as the page's tables.
    t1 = tables.table1(collect.load(study))
    assert pd.read_csv(out / "table1.csv", dtype=str).fillna("-").equals(t1.astype(str))
    md = (out / "table1.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(t1.columns) + " |" and len(md) == len(t1) + 2
    tex = (out / "table1.tex").read_text()
    assert "\\begin{tabular}" in tex and tables.PIXELS_ROW in tex
    assert "1\\%" in tex and " 1%" not in tex  # % would comment out the rest of a row
    assert (out / "gains.csv").exists() and "href='table1.tex'" in page
    assert f"{gone}: finetune" in page and "partial sweep" in page  # what is missing
    # Top-down: the summary (data, budgets, headline, findings, warnings), Table 1, the
    # figures, then the appendix with every table and the fits.
    order = [page.index(x) for x in ("<h2>Summary</h2>", "what pretraining buys",
                                     "The paper's findings at this scale", "Warnings",
                                     "Table 1: top-1 by model", "<figure>", "<h2>Appendix</h2>",
                                     "Label-efficiency curves", "<h3>Protocol</h3>")]
    assert order == sorted(order), order
    assert "a partial sweep: 5 stage results are missing" in page
    assert "python studies/model_size.py --repeats 3" in page and "abc" in page
    assert "95% interval" in page and "label-efficiency multiplier" in page
    assert "Joint fit" in page and "not fitted" not in page
    assert "Relative improvement over the smallest model" in page
    protocols = tables.protocol_table(collect.load(study))
    assert list(protocols["stage"]) == ["pretrain", "finetune", "distill", "supervised",
                                        "pixels"]
    assert json.loads(protocols["protocol"].iloc[0]) == {"probe": "test top-1"}
    tidy = pd.read_csv(out / "results_tidy.csv")
    # The shared-run keys as text: a finetune row rests on itself, its pretraining and
    # its draws (seed, subset).
    ft_runs = tidy.loc[tidy["stage"] == "finetune", "runs"].iloc[0].split(";")
    assert len(ft_runs) == 4 and all(k and "frozenset" not in k for k in ft_runs)
    assert len(tidy) == len(rows) - 5 and "an-earlier-grid" not in set(tidy["cell"])

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    shot = tmp_path / "page.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,3000", path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", path.as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert dom.count("<img") == 8 and "Label-efficiency curves" in dom
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape[0] >= 2000 and (pixels < 200).mean() > 0.01  # drawn, not blank


def test_report_cli_exits_2_without_results(tmp_path):
    assert report.main([str(tmp_path / "nothing")]) == 2


def test_improvement_table_is_the_mean_over_seeds_with_an_interval():
    df = _table(synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1]))
    t = tables.improvement_table(df)
    big = df[(df["stage"] == "finetune") & (df["model"] == "R34 1/8x +SK")
             & (df["label_fraction"] == 0.01)]
    row = t[(t["model"] == "R34 1/8x +SK") & (t["stage"] == "finetune")
            & (t["label fraction"] == 0.01)]
    assert row["relative improvement %"].item() == pytest.approx(
        100 * big["relative_improvement"].mean(), abs=0.01)
    # Head 3's two fine-tuning layers share each replicate's pretraining: 3, not 6.
    assert len(big) == 6 and row["replicates"].item() == 3
    assert row["95% interval"].item().startswith("[")
    # The synthetic data make bigger models gain more with fewer labels.
    gain = t[t["stage"] == "finetune"].set_index(["model", "label fraction"])
    assert gain.loc[("R34 1/8x +SK", 0.01), "relative improvement %"] > gain.loc[
        ("R34 1/8x +SK", 0.1), "relative improvement %"] > 0


def test_label_efficiency_is_measured_against_the_mean_supervised_baseline():
    df = _table(synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1, 0.5]))
    a = curves.analyse(df)
    row = next(d for d in a.derived if d["model"] == "R18 1/16x")
    sup = df[(df["model"] == "R18 1/16x") & (df["stage"] == "supervised")
             & (df["label_fraction"] == 0.5)]
    assert len(sup) == 6  # 3 seeds x 2 fine-tune layers
    assert row["target top-1 (supervised, most labels)"] == pytest.approx(
        100 * sup["top1"].mean(), abs=0.01)
    # In these data fine-tuning reaches the baseline's accuracy with fewer labels.
    assert row["labels, fine-tuned"] < row["labels, supervised"]
    assert row["label-efficiency multiplier"] > 1
    # "yes" only where the estimate and its whole interval lie in the measured counts.
    lo, hi = df["labels"].min(), df["labels"].max()
    for d in a.derived:
        ends = [float(e.replace(",", "")) for e in
                d["95% interval, fine-tuned labels"].strip("[]").split(", ")
                if e != "not reached"]
        if d["within measured labels"] == "yes":
            assert all(lo <= e <= hi for e in ends) and len(ends) == 2, d


def test_numbers_in_tables_have_one_precision_and_never_e_notation():
    from analysis.curves import _count, number

    assert _count(2972.4) == "2,972" and _count(33390.0) == "33,390"
    assert _count(float("inf")) == "not reached"
    assert number(33390.0) == "33,390" and number(0.35123) == "0.3512"
    assert number(12.3456) == "12.35" and "e" not in number(1.2e7)


def test_mean_intervals_are_student_t_and_honest_about_one_seed():
    from scipy import stats

    from analysis.curves import mean_interval

    values = np.array([0.61, 0.64, 0.58, 0.66, 0.63, 0.60])
    mean, lo, hi = mean_interval(values)
    half = stats.t.ppf(0.975, 5) * values.std(ddof=1) / np.sqrt(6)
    assert mean == pytest.approx(values.mean())
    assert (lo, hi) == pytest.approx((values.mean() - half, values.mean() + half))
    assert np.isnan(mean_interval([0.5])[1])  # one seed: no interval
    assert mean_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)
    # Two replicates: t(0.975, 1) = 12.7 standard errors each side.
    assert mean_interval([1.0, 2.0])[1:] == pytest.approx((1.5 - 6.353, 1.5 + 6.353), abs=1e-3)


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("effect", ["normal", "skewed"])
def test_the_interval_covers_the_true_mean_95_percent_of_the_time(n, effect):
    """4,000 simulated studies of n independent replicates each: the share of
    intervals holding the true mean is within [0.92, 0.98]. Skewed: gamma(4), skewness
    1 (seen: 0.93-0.94; gamma(2), skewness 1.4, falls to 0.91 at n >= 3)."""
    from analysis.curves import mean_interval

    rng = np.random.default_rng(n)
    draws = (rng.normal(1.0, 2.0, (4000, n)) if effect == "normal"
             else rng.gamma(4.0, 1.0, (4000, n)))
    true = 1.0 if effect == "normal" else 4.0
    held = [lo <= true <= hi for _, lo, hi in map(mean_interval, draws)]
    assert 0.92 <= np.mean(held) <= 0.98


def test_two_label_counts_get_points_but_no_fitted_curve():
    """The local study's shape: 2 fractions. No form is drawn through (or extrapolated
    from) as many points as it has parameters."""
    df = _table(synthetic_rows(seeds=(0, 1), fractions=[0.01, 0.1]))
    a = curves.analyse(df)
    assert a.fits == {} and a.derived == []
    assert a.joint.startswith("not fitted")
    assert any("more points than parameters" in n for n in a.notes)
    drawn = figures.figure_set(df, a, None, findings([df]))
    assert "No curves" in drawn["label_efficiency"][1]
    assert "over 2 replicates" in drawn["top1_vs_params"][1]


def test_headline_gives_both_margins_and_the_findings_tables_verdicts_word_for_word():
    from analysis import summary
    from analysis.findings import findings
    from analysis.headline import headline

    rows = synthetic_rows(seeds=(0, 1, 2), fractions=[0.001, 0.1], head_depths=(1,))
    df = _table(rows)
    for primaries in ((), ("P:1/16x at 0.1%", "F1")):
        found = findings([df], primaries)
        text = headline(df, found)
        lines = text.splitlines()
        assert "raw 95% Student-t interval over 3 independent replicates; with 3 it is " \
               "+-4.3 standard errors" in lines[0]
        few, many = (lines.index(f"  at {x}:") for x in ("0.1% labels (60 images)",
                                                          "10% labels (6,000 images)"))
        assert few < many
        for against in ("supervised", "pixels"):
            g = tables.gain(df, against).set_index(["model", "label fraction"])
            for model in ("R18 1/16x", "R34 1/8x +SK"):
                line = next(x for x in lines[few:many] if x.strip().startswith(model))
                r = g.loc[(model, 0.001)]
                assert (f"vs {against} {r['gain (pp)']:+.1f} [{r['_lo']:+.1f}, "
                        f"{r['_hi']:+.1f}]") in line
        # Every verdict the headline and the summary give is the findings table's.
        start = next(i for i, x in enumerate(lines) if x.startswith("verdicts, the findings"))
        given = [x.strip() for x in lines[start + 1:]]
        table = found[found["finding"].isin(["P", "F1"])]
        assert given == [f"{r['comparison']}: {r['verdict']} ({r['role']})"
                         for _, r in table.iterrows()]
        boxed = summary.findings_lines(found)
        assert [x.rsplit(": ", 1)[1] for x in boxed] == list(found["verdict"])
        assert not any("helps" in x or "resolved" in x for x in lines + boxed)
    # Pre-registered: P at 1/16x and F1 are the primary family (3 effects), so at
    # most those 3 are Holm-adjusted together; the rest is exploratory.
    assert (found["role"] == "primary").sum() == 3
    assert "over the 3 pre-registered primary effects" in text
    assert headline(df[df["stage"] == "pretrain"]) == ""


def test_the_compact_results_table_holds_each_arms_mean_by_model_and_count():
    from analysis.headline import results_table

    df = _table(synthetic_rows(seeds=(0, 1, 2), fractions=[0.001, 0.1], head_depths=(1,)))
    lines = results_table(df).splitlines()
    assert lines[0].startswith("test top-1 %, mean over 3 replicates")
    assert "0.1% (60)" in lines[1] and "10% (6,000)" in lines[1]
    body = [ln for ln in lines[3:] if ln.strip()]
    assert body[-1].split()[:2] == ["raw", "pixels"]  # the pixel arm once, last
    small = [ln for ln in body if ln.startswith("R18 1/16x")][0]  # fine-tuned comes first
    ft = df[(df["stage"] == "finetune") & (df["model"] == "R18 1/16x")]
    want = [f"{100 * ft[ft['label_fraction'] == lf]['top1'].mean():.1f}" for lf in (0.001, 0.1)]
    assert small.split()[-2:] == want and "fine-tuned" in small
    # models in order of size, the smaller first
    assert lines.index(small) < lines.index(next(ln for ln in body if ln.startswith("R34")))
    assert results_table(df[df["stage"] == "pretrain"]) == ""


def test_the_summary_warns_when_a_baseline_without_pretraining_wins_everywhere():
    from analysis import summary

    rows = synthetic_rows(seeds=(0, 1), fractions=[0.01, 0.1], head_depths=(1,))
    for r in rows:
        if r["stage"] == "pixels" and r["finetune.label_fraction"] == 0.1:
            r["top1"] = 0.999  # above every fine-tuned model at 10% only
        if r["stage"] == "pretrain":
            r["pixel_linear_top1"] = 0.999
    df = _table(rows)
    said = summary.warnings(df, [])
    assert len(said) == 3, said
    assert said[0].startswith("at 10% labels the pixel arm (99.9) beats every fine-tuned model")
    assert said[1].startswith("the linear probe on raw pixels (99.9) beats every pretrained")
    assert said[2].startswith("n = 2 replicates")
    three = _table(synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1], head_depths=(1,)))
    assert summary.warnings(three, []) == []  # the synthetic pretraining wins everywhere
    assert summary.warnings(three, ["c: finetune"]) == [
        "a partial sweep: 1 stage results are missing (appendix)"]
    lines = summary.data_and_budgets(three)
    assert "labelled subsets: 1% (600 images), 10% (6,000 images)" in lines[0]
    assert lines[-1] == "3 independent replicates per cell"
    # Budgets as run: a subset smaller than a batch is one batch an epoch, so 100
    # steps at 50 labels are 100 epochs whatever finetune.epochs says (issue 37).
    small = _table([{**r, "step": 100, "finetune.batch_size": 256, "finetune.epochs": 5}
                    | ({"labelled_examples": 50} if r["stage"] == "finetune" else {})
                    for r in synthetic_rows(seeds=(0,), fractions=[0.001], head_depths=(1,))])
    budget = summary.data_and_budgets(small)[1]
    assert "fine-tuning 100 steps at 0.1% (100 epochs)" in budget, budget


def test_gains_count_replicates_that_share_a_run_or_a_draw_once():
    """Seeds crossed with one labelled subset share its draw (and the pixel run): no
    gain has more than one independent value. Each seed its own subset: three."""
    rows = synthetic_rows(seeds=(0, 1, 2), fractions=[0.01], head_depths=(1,))
    assert (tables.gain(_table(rows), "supervised")["replicates"] == 3).all()
    crossed = [{**r, "finetune.subset_seed": 0,
                "stage_key": "x-shared" if r["stage"] == "pixels" else r["stage_key"]}
               for r in rows]
    df = _table(crossed)
    for against in ("supervised", "pixels"):
        g = tables.gain(df, against)
        assert (g["replicates"] == 1).all() and g["95% interval (pp)"].str.startswith(
            "n/a").all()


def test_label_subsets_are_replicates_and_distillation_gaps_are_per_unlabelled_set():
    rows = []
    for subset in (0, 1):  # replicate r: seed r and subset r (its own pretraining)
        for r in synthetic_rows(seeds=(subset,), fractions=[0.01], head_depths=(1,)):
            r = {**r, "finetune.subset_seed": subset, "cell": r["cell"] + f",subset={subset}"}
            for unl in ("fashion-mnist", "dead-leaves"):
                if r["stage"] == "distill":
                    rows.append({**r, "distill.unlabelled.name": unl,
                                 "top1": r["teacher_top1"] - (0.01 if unl == "dead-leaves"
                                                              else 0.002 * (1 + subset)),
                                 "cell": r["cell"] + f",unl={unl}"})
            if r["stage"] != "distill":
                rows.append(r)
    df = _table(rows)
    assert df["replicate"].nunique() == 2
    gaps = tables.distill_gap(df).set_index(["teacher", "unlabelled"])
    one = gaps.loc[("R18 1/16x", "fashion-mnist")]
    assert one["replicates"] == 2 and one["student minus teacher (pp)"] == pytest.approx(-0.3)
    assert one["95% interval (pp)"] == "[-1.57, 0.97]"  # t(0.975, 1) x 0.1: two replicates
    dead = gaps.loc[("R18 1/16x", "dead-leaves")]
    assert dead["student minus teacher (pp)"] == pytest.approx(-1.0)
    assert dead["95% interval (pp)"] == "[-1.00, -1.00]"  # equal values: zero width
    # The same subsets on one pretraining run: its two values are one replicate.
    shared = df.assign(runs=[frozenset({"one-pretraining"}) | r for r in df["runs"]])
    one = tables.distill_gap(shared).set_index(["teacher", "unlabelled"]).loc[
        ("R18 1/16x", "fashion-mnist")]
    assert one["replicates"] == 1 and one["95% interval (pp)"].startswith("n/a")


def test_table1_shows_the_pixel_arm_and_the_raw_pixel_probes_in_one_row():
    rows = [{**r, "pixel_linear_top1": 0.84, "pixel_knn_top1": 0.79}
            for r in synthetic_rows(seeds=(0, 1), fractions=[0.1], head_depths=(1,))]
    df = _table(rows)
    t = tables.table1(df).set_index("model")
    row = t.loc[tables.PIXELS_ROW]
    assert row[["linear", "kNN"]].tolist() == ["84.0", "79.0"]
    assert row["fine-tune 10%"] == "-"
    # The pixel arm's runs count once each, however many models share them.
    px = 100 * df[df["stage"] == "pixels"].drop_duplicates("stage_key")["top1"]
    assert len(px) == 2 and row["pixel arm 10%"] == f"{px.mean():.1f} ± {px.std():.1f}"
    assert row["supervised 10%"] == "-"  # its own column, not under supervised (issue 37)


def test_findings_recover_effects_built_into_synthetic_studies():
    from analysis.findings import findings

    rows = synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1], head_depths=(2, 3))
    g = np.random.default_rng(1)
    for r in rows:  # F3: a deep head from its middle layer helps, most with few labels
        if r["stage"] == "finetune" and r["head.num_layers"] == 3 and r["finetune.head_layer"] == 1:
            r["top1"] += (0.05 if r["finetune.label_fraction"] == 0.01 else 0.01) + g.normal(
                0, 0.002)
    df = _table(rows)
    t = findings([df])
    by = {f: t[t["finding"] == f] for f in ("P", "F1", "F2", "F3", "F4")}
    assert (t["role"] == "exploratory").all()  # nothing was pre-registered
    # P: fine-tuning's error curve lies well below supervised's at 600 labels.
    few = by["P"][by["P"]["comparison"].str.contains("at 1% labels")]
    assert len(few) == 12 and (few["verdict"] == "reproduced").all()
    assert len(by["P"]) == 24  # and at 10%: P at every label count, fewest first
    assert list(by["P"]["comparison"].str.contains("at 1% labels")) == [True] * 12 + [False] * 12
    # F1: the widest model's gain minus the narrowest's at 1%, paired within a
    # replicate (head setting and seed). Built in: the supervised network gains with
    # size as much as fine-tuning does, so the gain shrinks with size (reversed).
    ft = df[df["stage"] == "finetune"]
    key = ["head_depth", "ft_layer", "seed", "label_fraction"]
    wide = ft[ft["model"] == "R34 1/8x +SK"].set_index(key)["gain_over_best"]
    narrow = ft[ft["model"] == "R18 1/16x"].set_index(key)["gain_over_best"]
    diff = (wide - narrow).xs(0.01, level="label_fraction")
    per_replicate = diff.groupby(level=["seed", "head_depth"]).mean()  # a head: its own run
    f1 = by["F1"].set_index("comparison")
    contrast = f1.loc["R34 1/8x +SK - R18 1/16x at 1% labels: gain over the best baseline "
                      "without pretraining"]
    # Shared draws: a seed's head settings are one replicate, not two.
    assert contrast["replicates"] == 3
    assert contrast["effect"] == pytest.approx(
        100 * per_replicate.groupby(level="seed").mean().mean(), abs=0.01)
    assert contrast["effect"] < 0 and len(f1) == 2
    # F2: students are built 3% better than their teachers, relative to the error.
    assert (by["F2"]["verdict"].str.startswith("reproduced")).all()
    assert (by["F2"]["effect"] > 0).all()
    f3 = by["F3"].set_index("comparison")
    few = f3.loc["R18 1/16x at 1% labels: head 3 from layer 1 - head 2 from layer 0"]
    assert few["verdict"].startswith("reproduced") and few["effect"] > 4
    assert f3.loc["R18 1/16x: the effect at 1% minus at 10%", "verdict"].startswith(
        "reproduced")
    assert len(by["F4"]) == 1 and by["F4"]["verdict"].iloc[0].startswith("reproduced")
    assert by["F4"]["unit"].iloc[0] == "%"
    # Pooled over 4 (head, layer) settings: the two layers of a head share its
    # pretraining run, and the heads of one seed its labelled subset: 3 replicates.
    assert by["F4"]["replicates"].iloc[0] == 3
    # The figure draws each row's interval; the report shows it.
    fig = figures.findings_figure(t)
    bars = [c for c in fig.axes[0].collections if len(c.get_segments())]
    assert len(bars) == len(t)
    lo, hi = bars[-1].get_segments()[0][:, 0]  # the top row: the table's first
    assert (lo, hi) == pytest.approx((t["_lo"].iloc[0], t["_hi"].iloc[0]))
    assert "findings" in figures.figure_set(_table(rows), curves.analyse(_table(rows)), None,
                                           findings([_table(rows)]))


def test_findings_cli_writes_the_table_and_figure(tmp_path, capsys):
    from analysis.findings import main

    study = _write_study(tmp_path, synthetic_rows(seeds=(0, 1), fractions=[0.01, 0.1],
                                                  head_depths=(1,)))
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "out" / "findings.md").read_text()
    assert md in printed and md.startswith("| finding | role | comparison | effect | unit")
    assert md.count("| P |") == 6  # three models at 1% and at 10%
    assert "no primary findings were registered" in md
    assert (tmp_path / "out" / "findings.png").read_bytes()[:4] == b"\x89PNG"
    csv = pd.read_csv(tmp_path / "out" / "findings.csv")
    assert {"_lo", "_hi", "verdict"} <= set(csv.columns) and (csv["study"] == "synthetic").all()
    assert main([str(tmp_path / "nothing")]) == 2


def test_bootstrap_percentiles_of_unreachable_errors_stay_infinite():
    from analysis.curves import _percentile

    assert _percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert _percentile([1.0, 2.0, np.inf, np.inf], 97.5) == np.inf  # not nan
    assert _percentile([1.0, 2.0, np.inf, np.inf], 2.5) == 1.0


def test_findings_verdicts_are_holm_adjusted_and_say_what_could_be_detected():
    from scipy import stats

    from analysis.findings import _test, detectable, holm, verdict

    # Holm by hand: sorted 0.005 x4, 0.01 x3, 0.03 x2, 0.04 x1, made monotone.
    adjusted = holm(np.array([0.01, 0.04, 0.03, 0.005, np.nan]))
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and np.isnan(adjusted[4])
    # An effect of 2 pp with se 1 over 4 replicates: the t-test's p and se; in a
    # family of 5 tests the smallest effect found with 80% power at Holm's strictest
    # level (1%): the noncentral t's, above the normal-style (t(0.995, 3) + t(0.8, 3)) se.
    q = stats.t.ppf(0.975, 3)
    p, se = _test(2.0, 2.0 - q, 2.0 + q, 4)
    assert p == pytest.approx(2 * stats.t.sf(2.0, 3)) and se == pytest.approx(1.0)
    least = detectable(se, 4, 5)
    crit = stats.t.ppf(0.995, 3)
    assert stats.nct.sf(crit, 3, least / se) + stats.nct.cdf(-crit, 3, least / se) \
        == pytest.approx(0.8, abs=1e-6)
    assert least > stats.t.ppf(0.995, 3) + stats.t.ppf(0.8, 3)
    assert verdict(2.0, p, least, 4) == (f"not decided (80% power needs {least:.2f} pp; "
                                         "spread from 4 replicates, 3 df)")
    assert verdict(-3.0, 0.01, 1.0) == "reversed" and verdict(3.0, 0.01, 1.0) == "reproduced"
    assert verdict(1.0, float("nan"), float("nan")) == "one run per model: no interval"


def test_values_sharing_a_run_directly_or_through_others_form_one_cluster():
    from analysis import replicates

    shared = [frozenset(x) for x in ({"a"}, {"b"}, {"a", "c"}, {"c", "d"}, {"e"}, set())]
    labels = replicates.clusters(shared)
    assert labels[0] == labels[2] == labels[3]  # a-c-d: linked through the third
    assert len({labels[0], labels[1], labels[4], labels[5]}) == 4
    # One value per cluster: its mean; NaN values are left out before clustering.
    means = replicates.cluster_means([1.0, 5.0, 2.0, 3.0, 7.0, np.nan], shared)
    assert sorted(means) == [2.0, 5.0, 7.0]
    mean, lo, hi, n = replicates.effect([1.0, 5.0, 2.0, 3.0, 7.0, np.nan], shared)
    assert n == 3 and mean == pytest.approx(14 / 3) and lo < mean < hi


def test_f2_compares_a_smaller_student_with_the_small_model_fine_tuned():
    """The paper's F2 for a smaller student: distilled small model minus the same small
    model fine-tuned on the same labels (here from another study's table), not minus
    its teacher."""
    from analysis.findings import f2

    rows = synthetic_rows(seeds=(0, 1, 2), fractions=[0.01], head_depths=(1,), students=True)
    df = _table(rows)
    distilled = df[df["stage"] != "finetune"]  # the distillation study's own table
    finetuned = df[df["stage"] == "finetune"]  # the model-size study's
    out = {r["comparison"]: r for r in f2(distilled, finetuned)}
    key = "R34 1/8x +SK -> R18 1/16x at 1% labels: distilled R18 1/16x - fine-tuned R18 1/16x"
    big = df[(df["stage"] == "distill") & (df["model"] == "R34 1/8x +SK")].sort_values("seed")
    small = finetuned[finetuned["model"] == "R18 1/16x"].sort_values("seed")
    want = 100 * (big["top1"].to_numpy() - small["top1"].to_numpy()).mean()
    assert out[key]["effect"] == pytest.approx(want, abs=0.01)
    assert out[key]["replicates"] == 3 and want > 0
    # The smallest teacher's student has its architecture: self-distillation, vs teacher.
    assert "R18 1/16x -> itself at 1% labels: student - teacher" in out
    assert f2(distilled) == [r for r in f2(distilled) if "itself" in r["comparison"]]


def test_f2_matches_the_small_models_recipe_lists_included_and_skips_a_study_without_it():
    """An LR grid is a list in the tidy table: the recipe match compares it whole (it
    once raised 'Lengths must match' on the distillation study's own report)."""
    from analysis.findings import f2

    rows = synthetic_rows(seeds=(0, 1, 2), fractions=[0.01], students=True)
    for r in rows:
        r["finetune.lr_grid"] = [0.005, 0.02]
    df = _table(rows)
    alone = df[df["model"] != "R18 1/16x"]  # the small model not fine-tuned in this study
    assert all("itself" in r["comparison"] or "fine-tuned" in r["comparison"]
               for r in f2(alone, alone))
    both = f2(df, df)
    assert any("distilled R18 1/16x - fine-tuned R18 1/16x" in r["comparison"] for r in both)
    other = df.copy()
    other["finetune.lr_grid"] = [[0.1]] * len(other)  # another recipe: no match
    small = other[other["model"] == "R18 1/16x"]
    assert not any("fine-tuned R18 1/16x" in r["comparison"]
                   for r in f2(df, pd.concat([df[df["model"] != "R18 1/16x"], small])))


def test_figure_1s_title_follows_the_data_it_draws():
    """Issue 37: the title said 'the largest model is best at 3 of 3 label fractions'
    where two models tied and the pixel arm lay above every point. Perturbing the data
    changes the sentence."""
    from analysis.figures import size_title

    names = pd.Series({0.04: "R18 1/16x", 0.18: "R18 1/8x", 0.7: "R18 1/4x"})
    m = pd.DataFrame({"label_fraction": [0.001] * 3 + [0.1] * 3,
                      "params": [0.04, 0.18, 0.7] * 2,
                      "mean": [0.55, 0.578, 0.578, 0.70, 0.75, 0.80]})
    title = size_title("finetune", m, names, {0.001: 60.0, 0.1: 70.0})
    assert "R18 1/8x and R18 1/4x at 0.1%" in title and "R18 1/4x at 10%" in title
    assert "pixel arm (dotted) is above every model at 0.1%" in title
    assert "10%" not in title.split("above every model at")[1]
    untied = m.assign(mean=[0.55, 0.578, 0.59, 0.70, 0.75, 0.80])
    title = size_title("finetune", untied, names, {0.001: 50.0})
    assert "R18 1/4x at 0.1%" in title and " and " not in title and "pixel" not in title
    assert "best" not in title  # the means are described; the findings table decides


def test_figure_1s_caption_explains_selective_kernels_only_where_drawn():
    rows = synthetic_rows(seeds=(0, 1), fractions=[0.01, 0.1], head_depths=(1,))
    with_sk = _table(rows)
    without = _table([r for r in rows if r["model.sk_ratio"] == 0])
    cap = {name: figures.figure_set(d, curves.analyse(d), None, None)["top1_vs_params"][1]
           for name, d in (("sk", with_sk), ("plain", without))}
    assert "selective-kernel" in cap["sk"] and "selective-kernel" not in cap["plain"]


def test_every_figure_draws_one_kind_of_error_bar_and_says_so():
    """Issue 37: error bars were one SD in three figures and 95% t-intervals in two."""
    from scipy import stats

    from analysis.figures import _mean_sd, t_interval

    df = _table(synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1], head_depths=(2, 3),
                               students=True))
    captions = [c for _, c in figures.figure_set(df, curves.analyse(df), None, None).values()]
    assert not any("standard deviation" in c for c in captions)
    assert sum("95% Student-t" in c for c in captions) >= 5
    v = pd.DataFrame({"g": [1, 1, 1], "x": [1.0, 2.0, 4.0]})
    half = stats.t.ppf(0.975, 2) * np.std([1, 2, 4], ddof=1) / np.sqrt(3)
    assert _mean_sd(v, ["g"], "x")["ci"].iloc[0] == pytest.approx(half, rel=1e-12)
    assert t_interval(v["x"]) == pytest.approx((7 / 3 - half, 7 / 3 + half), rel=1e-12)


def test_no_figure_draws_text_under_9_points():
    """Issue 37: fonts of about 7 px in two figures."""
    from matplotlib.text import Text

    df = _table(synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1], head_depths=(2, 3),
                               students=True))
    history = pd.DataFrame({"stage": "pretrain", "model": "R18 1/16x", "run": ["a", "a", "b", "b"],
                            "replicate": 0, "step": [1, 2, 1, 2], "loss": [2.0, 1.0, 2.1, 1.1]})
    found = __import__("analysis.findings", fromlist=["findings"]).findings([df])
    held = __import__("analysis.validation", fromlist=["validate"]).validate(
        df, resamples=10).held
    drawn = figures.figure_set(df, curves.analyse(df), history, found, held)
    assert "predicted_vs_measured" in drawn
    for name, (draw, _) in drawn.items():
        fig = draw()
        small = {(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text().strip() and t.get_fontsize() < 9}
        assert not small, (name, sorted(small)[:5])
        matplotlib.pyplot.close(fig)


def test_a_label_fraction_has_one_colour_and_models_one_order_in_every_figure():
    """Issue 37: fraction colours swapped between Figure 1 and the training curves, and
    the label-efficiency legend was alphabetical."""
    from matplotlib.colors import to_hex

    df = _table(synthetic_rows(seeds=(0, 1), fractions=[0.01, 0.1], head_depths=(1,)))
    fig1 = figures.top1_vs_params(df)
    handles, labels = fig1.axes[0].get_legend_handles_labels()
    first = {lab: to_hex(h.lines[0].get_color()) for h, lab in zip(handles, labels, strict=True)
             if lab.endswith("%")}
    history = pd.DataFrame({
        "stage": ["pretrain"] * 2 + ["finetune"] * 4, "model": "R18 1/16x",
        "run": ["pretraining"] * 2 + ["10%, lr 0.02"] * 2 + ["1%, lr 0.02"] * 2,
        "replicate": 0, "step": [1, 2] * 3, "loss": [2.0, 1.0] * 3,
        "label_fraction": [np.nan, np.nan, 0.1, 0.1, 0.01, 0.01], "params": 44_000})
    curves_fig = figures.training_curves(history)
    drawn = {line.get_label().split(",")[0]: to_hex(line.get_color())
             for ax in curves_fig.axes for line in ax.lines if "lr" in line.get_label()}
    assert drawn == {k: v for k, v in first.items() if k in drawn} and len(drawn) == 2
    # An order that is not the alphabet's: R34 given fewer parameters than R18 1/8x.
    small = _table([{**r, "params": 100_000} if r["model.depth"] == 34 else r
                    for r in synthetic_rows(seeds=(0, 1), fractions=[0.01, 0.1],
                                            head_depths=(1,))])
    eff = figures.label_efficiency(small, {})
    names = [t.get_text() for t in eff.axes[0].get_legend().get_texts()]
    order = [n.rsplit(" ", 1)[0] for n in names if n.endswith("fine-tuned")]
    assert order == ["R18 1/16x", "R34 1/8x +SK", "R18 1/8x"]  # by parameters
    assert "pixel arm (no network)" in names


def test_tables_say_each_thing_once():
    """Issue 37: the gains table repeated the pixel rows as 'best baseline' rows, and
    the smallest model's relative improvement over itself read 0 [0.00, 0.00]."""
    df = _table(synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1], head_depths=(1,)))
    imp = tables.improvement_table(df)
    assert "R18 1/16x" not in set(imp["model"]) and len(imp) > 0
    g = tables.gains_table(df)
    best = tables.BASELINES["best"][0]
    chose = set(df.loc[df["stage"] == "finetune", "best_baseline"])
    assert chose == {"supervised"} and best not in set(g["against"])  # one baseline won
    assert set(g["better on validation"]) == {"supervised"}
    # Where validation chose differently between a row's cells, the best rows stay.
    flip = df.copy()
    one = flip.index[(flip["stage"] == "finetune") & (flip["seed"] == 0)]
    flip.loc[one, "best_baseline"] = "pixels"
    mixed = tables.gains_table(flip)
    assert best in set(mixed["against"]) and "mixed" in set(mixed["better on validation"])


def test_the_bottom_line_covers_every_label_count_and_says_where_and_how_long():
    """Issue 37: the console ended with a verdict about 0.1% only, and nothing said the
    dataset, the budget, the machine or the time against the estimate."""
    from analysis import summary
    from analysis.findings import findings
    from analysis.headline import bottom_line, headline

    df = _table(synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1], head_depths=(1,)))
    found = findings([df])
    inv = [{"seconds": 1000.0, "estimate_s": 600.0, "cpus": 2.0, "gpus": None,
            "load_per_core_at_start": 0.1, "cluster": False}]
    text = bottom_line(df, found, inv, summary.data_and_budgets(df))
    lines = text.splitlines()
    p = found[found["finding"] == "P"]
    for _, r in p.iterrows():  # every P row, each with the table's verdict
        model, _, rest = r["comparison"].partition(" at ")
        assert any(f"at {rest.split(' labels')[0]} labels, {model}:" in x
                   and x.endswith(f"{r['verdict']} ({r['role']})") for x in lines), r
    assert any("1% labels" in x for x in lines) and any("10% labels" in x for x in lines)
    assert "Fashion-MNIST" in text and "3 independent replicates per cell" in text
    # Beside the bottom line the headline gives F1's verdicts only: P's are below.
    beside = headline(df, found, ("F1",))
    assert "fine-tuned - best baseline" not in beside.split("verdicts, ")[1]
    assert "2 CPU cores (no GPU) of one machine: 16m40s" in text and "10m00s" in text
    assert "busy" not in text
    busy = bottom_line(df, found, [inv[0] | {"load_per_core_at_start": 1.3},
                                   {"seconds": 200.0, "cpus": 2.0}])
    assert "busy at the start (load 1.30 a core)" in busy and "20m00s" in busy
    assert "2 invocations" in busy
    gpu = bottom_line(df, found, [{"seconds": 7200.0, "gpus": 8.0, "cluster": True,
                                   "gpu_type": "accelerator_type:H100"}])
    assert "8 GPUs (H100) of a Ray cluster: 2h00m" in gpu
    # The compute: each distinct stage run once, however many cells reused it.
    runs = df.drop_duplicates("stage_key")
    costed = df.assign(cpu_hours=0.5)
    assert (f"training compute: {0.5 * len(runs):.2f} CPU core-hours over {len(runs)} "
            "distinct stage runs") in bottom_line(costed, found)


def test_captions_follow_the_number_of_replicates():
    """Issue 37: the findings caption said 'With 2 replicates ... t = 12.7' in a study
    of 3."""
    from analysis.figures import findings_caption
    from analysis.findings import findings
    from analysis.headline import headline

    for seeds, t in (((0, 1), "12.7"), ((0, 1, 2), "4.3"), ((0, 1, 2, 3, 4), "2.8")):
        df = _table(synthetic_rows(seeds=seeds, fractions=[0.01, 0.1], head_depths=(1,)))
        found = findings([df])
        cap = findings_caption(found)
        assert f"With {len(seeds)} replicates an interval spans +-{t} standard errors" in cap
        assert f"over {len(seeds)} independent replicates; with {len(seeds)} it is +-{t}" in \
            headline(df, found)


def test_two_studies_compare_paired_within_replicates(tmp_path):
    """Issue 37: one report of a variant against the default study."""
    rows = synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1], head_depths=(1,))
    first = _write_study(tmp_path / "a", rows)
    g = np.random.default_rng(3)
    variant = [{**r, "study": "variant", "top1": r["top1"] + 0.02 + g.normal(0, 0.002),
                "stage_key": "v" + r["stage_key"]} if r["stage"] == "finetune" else r
               for r in rows]
    second = _write_study(tmp_path / "b", variant)
    assert report.main([str(first), str(second)]) == 0
    out = second / "compare-synthetic"
    t = pd.read_csv(out / "compare.csv")
    ft = t[t["stage"] == "finetune"]
    assert len(ft) == 2 * 3 and (ft["second - first (pp)"].between(1.5, 2.5)).all()
    assert (ft["replicates"] == 3).all()
    sup = t[t["stage"] == "supervised"]  # the same runs in both: exactly 0
    assert (sup["second - first (pp)"] == 0).all()
    page = (out / "report.html").read_text()
    assert "against" in page and "raw 95%" in page and "no verdict" in page
    assert report.main([str(first), str(second), str(first)]) == 2
