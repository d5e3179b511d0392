"""Scaling laws over labels and size (analysis/laws.py), judged out of sample; the
published table read as a study (analysis/published.py); python -m analysis.predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import findings, laws, published
from analysis.curves import FitError

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "reference" / "simclrv2_table1.csv"  # the paper's Table 1, in the repository
SHARED = REPO.parent / "shared" / "data" / "simclrv2_table1.csv"  # the team's copy
COUNTS = np.array([50.0, 500.0, 5000.0])
SIZES = np.array([0.05, 0.2, 0.8, 3.2, 12.8, 51.2])


def _grid(sizes=SIZES, counts=COUNTS, sk=None) -> pd.DataFrame:
    rows = [{"model": f"m{i}{'sk' if sk is not None and sk[i] else ''}", "params_m": p,
             "depth": 18, "sk": float(sk[i]) if sk is not None else 0.0, "labels": n}
            for i, p in enumerate(sizes) for n in counts]
    return pd.DataFrame(rows)


TRUE = {  # each form's surface, parameters in laws.fit's order
    "additive": (2.0, 0.4, 0.05, 0.5, 0.08),
    "interaction": (1.5, 0.35, 0.15, 0.08),
    "power": (0.4, 0.05, 0.3, 0.1, 0.25, 0.12),
    "saturating": (0.3, 0.3, 0.2, 0.2, 0.4, 0.12, 0.1, 0.5, 0.08),
    "envelope": (0.5, 0.3, 0.2, 0.3, 0.4, 0.12, 0.2, 0.5, 0.08),
}


def _surface(form: str, pts: pd.DataFrame, terms=(), extra=()) -> np.ndarray:
    theta = np.array([*TRUE[form], *extra])
    return laws._curve(form, terms, theta, tuple(COUNTS), float(pts["depth"].min()), 0.9,
                       laws.Inputs.of(pts))


@pytest.mark.parametrize("form", laws.FORMS)
def test_each_law_recovers_its_own_surface(form):
    pts = _grid()
    pts["error"] = _surface(form, pts)
    law = laws.fit(pts, form, ceiling=0.9)
    got, want = law.predict(pts), pts["error"].to_numpy()
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(want)
    assert law.rmse_log <= 1e-4


def test_leave_one_out_of_an_exact_law_misses_nothing_and_the_choice_is_its_argmin():
    pts = _grid()
    pts["error"] = _surface("interaction", pts)
    r = laws.loo(pts, "interaction", ceiling=0.9)
    assert len(r) == pts.shape[0] and r["model"].nunique() == len(SIZES)
    assert r["miss"].abs().max() <= 1e-3 * r["measured"].abs().max()
    c = laws.choose(pts, 0.9)
    assert c.scores[c.name] == min(c.scores.values())
    for name, score in c.scores.items():  # each score is its loo's mean |miss|
        form, *terms = [t.strip() for t in name.split(" +")]
        assert score == pytest.approx(laws.loo(pts, form, tuple(terms), 0.9)["miss"].abs().mean())


def test_the_choice_is_out_of_sample_not_the_best_in_sample_fit():
    """A 3-parameter-per-count law always fits at least as well in sample as the
    2-parameter one nested in it; on noisy data from the smaller law, holding models
    out prefers the smaller. A choice made in sample would pick the other."""
    g = np.random.default_rng(3)
    pts = _grid()
    pts["error"] = _surface("power", pts) * np.exp(g.normal(0, 0.04, len(pts)))
    c = laws.choose(pts, 0.9, forms=("power", "saturating"))
    in_sample = {f: laws.fit(pts, f, ceiling=0.9).rmse_log for f in ("power", "saturating")}
    assert in_sample["saturating"] <= in_sample["power"]
    assert c.form == "power" and c.scores["power"] < c.scores["saturating"]


def test_an_sk_term_is_kept_only_where_it_predicts_better():
    sk = [0, 1, 0, 1, 0, 1]
    pts = _grid(sk=sk)
    pts["error"] = _surface("power", pts, ("sk",), (-0.25,))
    c = laws.choose(pts, 0.9, forms=("power", "interaction"))
    assert c.terms == ("sk",) and c.scores[f"{c.form} +sk"] < c.scores[c.form]
    assert not any("depth" in k for k in c.scores)  # depth does not vary: never tried
    with pytest.raises(FitError, match="sk term needs models that differ"):
        laws.fit(_grid().assign(error=0.3), "power", ("sk",))


def test_laws_refuse_what_the_data_cannot_determine():
    pts = _grid(sizes=SIZES[:2])
    pts["error"] = _surface("interaction", pts)
    with pytest.raises(FitError, match="additive needs >= 3 model sizes; the data have 2"):
        laws.fit(pts, "additive")
    with pytest.raises(FitError, match="saturating needs >= 4"):
        laws.fit(pts, "saturating")
    with pytest.raises(FitError, match="form='cubic'; allowed: additive"):
        laws.fit(pts, "cubic")
    law = laws.fit(pts, "power")
    with pytest.raises(FitError, match=r"not measured"):
        law.predict(pts.assign(labels=123.0))


def test_a_held_out_models_own_numbers_never_reach_its_prediction():
    """Issue 38: nothing is tuned on the held-out model. Change a model's measured
    errors and its held-out prediction (law, centre, interval) stays the same to the
    last bit; the forward prediction likewise ignores the models it predicts."""
    g = np.random.default_rng(2)
    pts = _grid(sizes=SIZES[:5])
    pts["error"] = _surface("interaction", pts) * np.exp(g.normal(0, 0.03, len(pts)))
    forms = ("power", "interaction")
    before = laws.held_out(pts, 0.9, forms=forms)
    changed = pts.copy()
    changed.loc[changed["model"] == "m2", "error"] *= 1.3
    after = laws.held_out(changed, 0.9, forms=forms)
    cols = ["predicted", "low", "high", "law"]
    mine = before["model"] == "m2"
    pd.testing.assert_frame_equal(before.loc[mine, cols], after.loc[mine, cols])
    assert not before.loc[~mine, "predicted"].equals(after.loc[~mine, "predicted"])
    # The check can fail: a planted leak (the model left in its own fit) is caught.
    def leaky(data: pd.DataFrame) -> np.ndarray:
        held = data.loc[data["model"] == "m2", laws.COLUMNS[:-1]]
        return laws.predict(data, held, 0.9, forms=forms).table["predicted"].to_numpy()

    assert not np.array_equal(leaky(pts), leaky(changed))
    ahead = laws.forward(pts, 1.0, 0.9, forms=forms).table
    bigger = pts.assign(error=np.where(pts["params_m"] >= 1.0, pts["error"] * 0.5, pts["error"]))
    again = laws.forward(bigger, 1.0, 0.9, forms=forms).table
    assert np.array_equal(ahead["predicted"], again["predicted"])
    assert np.array_equal(ahead["high"], again["high"])
    assert not np.array_equal(ahead["measured"], again["measured"])


def _study(rng: np.random.Generator, sizes: np.ndarray, replicates: int = 3):
    """Replicate rows of a study drawn from a power law along size per label count,
    with a misspecification per (model, count), a shared draw per replicate (its
    labelled subset) and noise."""
    a, b = np.array([0.42, 0.26, 0.25]), np.array([0.02, 0.12, 0.11])
    dev = rng.normal(0, 0.008, (len(sizes), 3)) + rng.normal(0, 0.008, (len(sizes), 1))
    rows = []
    for r in range(replicates):
        shared = rng.normal(0, 0.01, 3)
        for i, p in enumerate(sizes):
            for k, n in enumerate(COUNTS):
                e = a[k] * p ** -b[k] + dev[i, k] + shared[k] + rng.normal(0, 0.012)
                rows.append({"model": f"m{i}", "params_m": p, "depth": 18, "sk": 0.0,
                             "labels": n, "error": e, "cluster": r})
    return pd.DataFrame(rows)


def _coverage(sims: int, seed: int) -> tuple[float, float]:
    """Coverage of predict()'s 95% interval for the next size's mean over 3 replicates,
    fitted on 3 sizes; and of a mutant that leaves out the out-of-sample residual."""
    rng = np.random.default_rng(seed)
    sizes = np.array([0.044, 0.176, 0.70, 2.8])
    hit = mutant = total = 0
    for sim in range(sims):
        reps = _study(rng, sizes)
        train = reps[reps["model"] != "m3"]
        pts = train.groupby(laws.COLUMNS[:-1], as_index=False, sort=False)["error"].mean()
        new = reps[reps["model"] == "m3"].groupby(laws.COLUMNS[:-1], as_index=False)[
            "error"].mean()
        p = laws.predict(pts, new[laws.COLUMNS[:-1]], 0.9, train, resamples=25, rng=sim,
                         forms=("power", "interaction"))
        miss = np.abs(100 * (1 - new["error"].to_numpy()) - p.table["predicted"].to_numpy())
        t = stats.t.ppf(0.975, p.df)
        half = (p.table["high"] - p.table["predicted"]).to_numpy()
        fit_only = t * np.sqrt(np.clip((half / t) ** 2 - p.residual_sd ** 2, 0, None))
        hit += int((miss <= half).sum())
        mutant += int((miss <= fit_only).sum())
        total += len(miss)
    return hit / total, mutant / total


@pytest.mark.slow
def test_prediction_intervals_cover_at_least_90_percent_and_the_residual_term_matters():
    """Issue 38: at least 0.90 for a nominal 95% on simulated studies drawn from a
    known law with noise. The mutant without the law's out-of-sample spread (the
    resampled replicates alone) must fall short: the check can fail."""
    covered, mutant = _coverage(sims=100, seed=11)
    assert covered >= 0.90
    assert mutant < 0.90


@pytest.mark.slow
def test_intervals_from_leave_one_out_residuals_alone_cover_on_tables_without_replicates():
    """A published-style table: one run per model, SK varying; each sim holds one model
    out and predicts it from the law chosen on the others."""
    rng = np.random.default_rng(0)
    sizes = np.geomspace(20, 400, 8)
    sk = [0, 1, 0, 1, 0, 1, 0, 1]
    hit = total = 0
    for _ in range(100):  # 300 points; 60 sims (seed 5) covered 0.91, too close to call
        pts = _grid(sizes=sizes, counts=np.array([1e4, 1e5, 1e6]), sk=sk)
        true = (0.9 * pts["params_m"] ** -0.25 * (pts["labels"] / 1e4) ** -0.15 + 0.05) * np.exp(
            -0.2 * pts["sk"].gt(0))
        pts["error"] = true * np.exp(rng.normal(0, 0.02, len(pts)))
        held = pts["model"].unique()[rng.integers(len(sizes))]
        p = laws.predict(pts[pts["model"] != held], pts.loc[pts["model"] == held,
                                                            laws.COLUMNS[:-1]], 0.999,
                         forms=("power", "saturating"))
        measured = 100 * (1 - pts.loc[pts["model"] == held, "error"].to_numpy())
        hit += int(((measured >= p.table["low"]) & (measured <= p.table["high"])).sum())
        total += len(measured)
    assert hit / total >= 0.90


# --- the published table --------------------------------------------------------------


@pytest.mark.skipif(not SHARED.exists(), reason="no ../shared/data beside this checkout")
def test_the_repositorys_table_is_the_shared_one():
    assert TABLE.read_bytes() == SHARED.read_bytes()


def test_the_papers_table_reads_as_a_study():
    df = published.load(TABLE)
    ft = df[df["stage"] == "finetune"]
    assert ft["model"].nunique() == 13 and len(ft) == 39
    assert sorted(ft["label_fraction"].unique()) == [0.01, 0.1, 1.0]
    assert ft["labels"].max() == published.IMAGENET_TRAIN and (df["classes"] == 1000).all()
    sup = df[df["stage"] == "supervised"]
    assert len(sup) == 13 and (sup["label_fraction"] == 1.0).all()
    big = ft[(ft["model"] == "R152 3x +SK")].set_index("label_fraction")["top1"]
    assert big.round(3).tolist() == [0.749, 0.801, 0.831]
    assert df["replicate"].nunique() == 1
    assert published.is_published(TABLE)


def test_findings_on_the_table_give_directions_without_intervals():
    t = findings.findings([published.load(TABLE)]).set_index("finding")
    assert (t["verdict"] == "one run per model: no interval").all()
    assert (t["95% interval"] == "n/a").all()
    # F1 without baselines at 1%: (R152 3x+SK - R50 1x) at 1% minus at 100%.
    assert t.loc["F1", "effect"] == pytest.approx((74.9 - 57.9) - (83.1 - 76.3), abs=1e-9)
    assert "no baseline at 1%" in t.loc["F1", "comparison"]
    f4 = 100 * (74.9 / 57.9 - 1) - 100 * (83.1 / 76.3 - 1)
    assert t.loc["F4", "effect"] == pytest.approx(round(f4, 2), abs=1e-9)
    p = t.loc["P"]
    assert len(p) == 13 and p["comparison"].str.contains("at 100% labels").all()


def test_the_papers_figure_1_shape_is_drawn_from_its_own_numbers():
    """Figure 1 (right): the biggest model's relative improvement over R50 1x is
    largest with the fewest labels: 29.4% at 1%, 17.1% at 10%, 8.9% at 100%."""
    from analysis.figures import relative_improvement

    fig = relative_improvement(published.load(TABLE))
    want = [100 * (a / b - 1) for a, b in ((74.9, 57.9), (80.1, 68.4), (83.1, 76.3))]
    got = []
    for ax in fig.axes[:3]:
        line = ax.get_lines()[0]  # fine-tuned, drawn first
        x, y = line.get_xdata(), line.get_ydata()
        assert x.max() == pytest.approx(795)
        got.append(float(y[np.argmax(x)]))
    assert np.allclose(got, want, rtol=1e-9)
    assert got[0] > got[1] > got[2]
    assert "+29.4% at 1% labels, +8.9% at 100%" in fig.texts[0].get_text().replace("\n", " ")


def test_a_bad_published_table_is_refused_naming_column_value_and_what_is_allowed(tmp_path):
    good = ("depth,width,sk,params_m,finetune_1pct,finetune_100pct,linear_eval,supervised\n"
            "50,1,0,24,57.9,76.3,71.7,76.6\n")
    path = tmp_path / "t.csv"
    path.write_text(good.replace("linear_eval,", "").replace("71.7,", ""))
    assert not published.is_published(path)
    with pytest.raises(ValueError, match="columns linear_eval missing"):
        published.load(path)
    path.write_text(good.replace("57.9", "lots"))
    with pytest.raises(ValueError, match=r"finetune_1pct row 2 is 'lots'; allowed: a number"):
        published.load(path)
    path.write_text(good.replace("57.9", "579"))
    with pytest.raises(ValueError, match=r"finetune_1pct row 2 holds 579; allowed: top-1 in %"):
        published.load(path)
    path.write_text(good)
    assert published.is_published(path) and len(published.load(path)) == 4


# --- python -m analysis.predict ------------------------------------------------------


def test_predict_on_the_table_holds_the_model_out_and_prints_its_cost(capsys):
    from analysis import predict

    assert predict.main([str(TABLE), "--model", "depth=152,width=3,sk=1", "--fit-below", "200",
                         "--resamples", "10"]) == 0
    out = capsys.readouterr().out
    assert "R152 3x +SK (795M parameters)" in out
    for value in ("74.9", "80.1", "83.1"):
        assert f"measured {value} (held out of the fit)" in out
    assert "chosen by mean |leave-one-model-out miss|" in out and "H100-hours" in out
    assert predict.main([str(TABLE), "--model", "depth=152"]) == 2
    assert "--model" in capsys.readouterr().err
    assert predict.main([str(TABLE), "--model", "depth=152,width=3", "--fit-below", "-1"]) == 2
    assert "--fit-below" in capsys.readouterr().err


def test_a_studys_configuration_reads_back_from_study_json():
    """predict's cost estimate rebuilds the study's configuration from study.json's
    flattened one, per-fraction settings (a fraction's own dot) and lists included."""
    from scaling.configure import load_config, resolve, to_dict
    from scaling.study.folder import study_record
    from scaling.study.plan import make_study
    from scaling.study.results import unflatten as base_config
    from studies.model_size import STUDY

    preset = STUDY.presets["local"]
    base = load_config(resolve(preset.base), dict(preset.set))
    record = study_record(make_study("s", base, preset.axes, preset.stages))
    back = base_config(json.loads(json.dumps(record["config"])))
    want = {k: v for k, v in to_dict(base).items() if k not in ("runtime", "name")}
    got = {k: v for k, v in to_dict(back).items() if k not in ("runtime", "name")}
    assert got == want
    assert back.finetune.per_fraction[0.001].base_lr == 0.005


def test_predict_on_a_study_prints_the_interval_and_refuses_too_few_models(tmp_path, capsys):
    from test_analysis import _write_study, synthetic_rows

    from analysis import predict

    study = _write_study(tmp_path, synthetic_rows(seeds=(0, 1, 2), fractions=[0.01, 0.1, 1.0]))
    assert predict.main([str(study), "--model", "depth=50,width=1", "--resamples", "20"]) == 0
    out = capsys.readouterr().out
    assert "R50 1x" in out and "predicted from" in out
    assert "resamples of independent replicates" in out
    assert "no estimate (the study.json has no configuration)" in out
    lines = [x for x in out.splitlines() if x.startswith("  ") and "[" in x]
    assert len(lines) == 3
    for line in lines:
        centre, lo, hi = (float(v) for v in line.split(": ")[1].replace("[", "").replace(
            "]", "").replace(",", "").split()[:3])
        assert lo < centre < hi
    one = _write_study(tmp_path / "one", [r for r in synthetic_rows(fractions=[0.1])
                                          if r["params"] == 44_000])
    assert predict.main([str(one), "--model", "depth=50,width=1"]) == 2
    assert "model(s) to fit on" in capsys.readouterr().err


@pytest.mark.slow
def test_the_report_of_the_papers_table(tmp_path, capsys):
    """Issue 38's command: a report of the published table with its Figure-1 shape,
    the law chosen out of sample and the predicted-vs-measured figure."""
    from analysis import report

    out = tmp_path / "report"
    assert report.main([str(TABLE), "--out", str(out), "--fit-below", "200"]) == 0
    page = (out / "report.html").read_text()
    for name in ("top1_vs_params", "relative_improvement", "predicted_vs_measured", "findings"):
        assert (out / f"{name}.png").stat().st_size > 0 and f'alt="{name}"' in page
    assert "Which law predicts an untrained model" in page
    assert "one run per model: no interval" in page
    assert "forward, from the models under 200M" in page and "R152 3x +SK at 12,812" in page
    assert "In-sample fit of each law" in page  # the appendix, never the choice
    t1 = pd.read_csv(out / "table1.csv")
    assert len(t1) == 13 and "R152 3x +SK" in set(t1["model"])


@pytest.mark.parametrize("form", laws.FORMS)
def test_the_closed_form_jacobian_is_the_finite_difference_one(form):
    from scipy.optimize._numdiff import approx_derivative

    pts = _grid(sk=[0, 1, 0, 1, 0, 1]).assign(depth=[18, 18, 18, 34, 34, 34, 50, 50, 50] * 2)
    terms = ("sk", "depth")
    theta = np.array([*TRUE[form], -0.2, 0.1])
    x = laws.Inputs.of(pts)
    masks = laws._at(x, tuple(COUNTS))

    def log_err(t: np.ndarray) -> np.ndarray:
        return np.log(laws._curve(form, terms, t, tuple(COUNTS), 18.0, 0.9, x, masks))

    want = approx_derivative(log_err, theta, method="3-point")
    got = laws._jacobian(form, terms, theta, tuple(COUNTS), 18.0, 0.9, x, masks)
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want))
