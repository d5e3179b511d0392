"""The findings' statistics: exact power, coverage through the report's own path with
shared draws, and the sequential design's error rate, by simulation."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import collect, power
from analysis.findings import detectable, findings
from scaling.study.results import table


def _rejections(effect: float, sd: float, n: int, level: float, sims: int, seed: int
                ) -> float:
    x = np.random.default_rng(seed).normal(effect, sd, size=(sims, n))
    t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / np.sqrt(n))
    return float((2 * stats.t.sf(np.abs(t), n - 1) < level).mean())


@pytest.mark.parametrize(("n", "tests"), [(3, 1), (5, 3), (12, 9)])
def test_power_at_the_printed_detectable_effect_is_80_percent(n, tests):
    sd = 2.0
    least = detectable(sd / np.sqrt(n), n, tests)
    got = _rejections(least, sd, n, 0.05 / tests, sims=40_000, seed=n)
    assert abs(got - 0.80) <= 0.03, got
    # The normal-style shortcut the findings used to print: too small at few replicates.
    shortcut = (stats.t.ppf(1 - 0.025 / tests, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n)
    assert least > shortcut


def test_the_normal_style_shortcut_was_18_percent_short_at_3_replicates():
    """Issue 36's numbers: 3 replicates, Holm's strictest level over 9 effects."""
    sd, n, tests = 2.0, 3, 9
    least = detectable(sd / np.sqrt(n), n, tests)
    shortcut = (stats.t.ppf(1 - 0.025 / tests, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n)
    assert least / shortcut == pytest.approx(41.1 / 34.8, rel=0.01)
    assert abs(_rejections(shortcut, sd, n, 0.05 / tests, sims=40_000, seed=7) - 0.69) < 0.02


def test_replicates_needed_is_the_least_n_with_80_percent_power():
    sd, effect, level = 5.0, 4.0, 0.05 / 2
    n = power.replicates_needed(sd, effect, level)
    assert power.power(effect, sd, n, level) >= 0.8 > power.power(effect, sd, n - 1, level)
    assert power.replicates_needed(sd, 1e-3, level) is None  # beyond 10,000
    big = power.replicates_needed(1.0, 0.2, 0.05)  # past the coarse steps: still the least
    assert power.power(0.2, 1.0, big, 0.05) >= 0.8 > power.power(0.2, 1.0, big - 1, 0.05)


def _f4_study(rng: np.random.Generator, effect: float, subset_sd: float, noise_sd: float
              ) -> pd.DataFrame:
    """A study's raw rows: 5 replicates (each its seed and subset) of two models at two
    label fractions, with 1 or 2 head settings (each its own pretraining run) in a
    replicate: unequal clusters. The big model's relative improvement at the fewest
    labels minus at the most is ``effect`` plus the replicate's subset draw (shared by
    its head settings) plus noise per head setting."""
    rows = []
    for r in range(5):
        u = rng.normal(0, subset_sd)
        heads = [2, 3][: rng.integers(1, 3)]
        for hd in heads:
            e = rng.normal(0, noise_sd)
            for lf, rel in ((0.01, 0.10 + effect + u + e), (0.1, 0.10)):
                base_top1 = 0.6 + 0.2 * (lf == 0.1)
                for width, params, top1 in ((0.0625, 1000, base_top1),
                                            (0.25, 16000, base_top1 * (1 + rel))):
                    cell = f"w={width},hd={hd},lf={lf},r={r}"
                    base = {"study": "sim", "cell": cell, "status": "executed",
                            "git_commit": "x", "seed": r, "finetune.subset_seed": r,
                            "model.depth": 18, "model.width": width, "model.sk_ratio": 0.0,
                            "head.num_layers": hd, "finetune.head_layer": 0,
                            "finetune.label_fraction": lf, "data.name": "fashion-mnist",
                            "params": params}
                    rows += [{**base, "stage": "pretrain", "stage_key": f"p{width}{hd}{r}"},
                             {**base, "stage": "finetune", "stage_key": f"f{cell}",
                              "top1": top1, "labelled_examples": 60000 * lf}]
    return collect.tidy(table(rows))


@pytest.mark.parametrize("draws", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["shared-draws", "mutant-runs-only"])
def test_f4_interval_covers_through_collect_replicates_and_findings(draws):
    """Subset-dominated variance (80% of it) and unequal clusters: the report's own path
    covers at least 0.93. Mutant: clusters by stage runs only (the old rule) count a
    replicate's head settings apart, and coverage falls below."""
    rng = np.random.default_rng(36)
    sims, covered, effect = 300, 0, 0.03
    for _ in range(sims):
        df = _f4_study(rng, effect, subset_sd=0.04, noise_sd=0.02)
        if not draws:
            df["runs"] = [frozenset(k for k in r if ":" not in k) for r in df["runs"]]
        row = findings([df]).query("finding == 'F4'").iloc[0]
        covered += row["_lo"] <= 100 * effect <= row["_hi"]
    coverage = covered / sims
    print(f"coverage {coverage:.3f} ({'draws' if draws else 'runs only'})")
    if draws:
        assert coverage >= 0.93, coverage
    else:
        assert coverage < 0.90, coverage


def test_sequential_design_keeps_its_error_rate_and_its_planned_power():
    sd, effect, tests = 1.0, 1.0, 2
    looks = power.sequential_plan(sd, effect, tests, first=3, batch=3)
    assert looks is not None and looks[0] == 3 and len(looks) >= 2
    levels = power.spending([k / looks[-1] for k in looks])
    assert sum(levels) == pytest.approx(0.05) and levels[0] < levels[-1]
    rng = np.random.default_rng(0)
    sims = 4000
    null = [power.sequential_verdicts(rng.normal(0, sd, (looks[-1], tests)), looks, levels)[0]
            for _ in range(sims)]
    false = float(np.mean([(v != 0).any() for v in null]))
    assert false <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / sims), false
    hits = [power.sequential_verdicts(rng.normal(effect, sd, (looks[-1], tests)), looks,
                                      levels) for _ in range(sims)]
    decided = np.array([v for v, _ in hits])
    each = (decided == 1).mean(axis=0)  # per finding, decided on the paper's side
    assert (each >= 0.80 - 2 * np.sqrt(0.8 * 0.2 / sims)).all(), each
    assert np.mean([n for _, n in hits]) < looks[-1]  # it stops early on average


def test_the_power_plan_reads_the_committed_pilot_and_plans_each_primary():
    from analysis.pilot import plan_lines, spreads

    rows = spreads("docs/findings/pilot-2026-12-06.csv")  # the 2026-12-06 grid, 3 replicates
    p = rows[rows["finding"] == "P"]
    assert len(p) == 3 and (p["replicates"] == 3).all()  # written as F1 before issue 36
    sd = float(p[p["comparison"].str.startswith("R18 1/16x")]["sd"].iloc[0])
    lines = plan_lines(rows, ["P:1/16x"], 5.0, cost=lambda n: f"{n} units")
    assert len(lines) == 2 and "0.05/1" in lines[0]
    n = power.replicates_needed(sd, 5.0, 0.05)
    assert f"{n} replicates fixed ({n} units)" in lines[1] and "(2 df" in lines[1]
    # Two primaries: Holm's strictest level halves, so each needs at least as many.
    two = plan_lines(rows, ["P:1/16x", "F2:distilled"], 5.0)
    assert "0.05/2" in two[0] and len(two) == 3
    more = int(two[1].split(" replicates fixed")[0].rsplit("; ", 1)[1])
    assert more >= n
    assert "no effect matching" in plan_lines(rows, ["F3:R50"], 5.0)[0]


def test_primaries_are_registered_before_results_and_never_changed_after(tmp_path):
    import json

    from scaling.study.folder import StudyClash, with_primaries

    folder = tmp_path / "study"
    record = {"study": "s", "git_commit": "abc"}
    registered = with_primaries(folder, record, ["P:1/16x"])
    assert registered["primaries"]["findings"] == ["P:1/16x"]
    assert registered["primaries"]["registered"][:4].isdigit()
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(registered))
    # A resumed run without --primary keeps them; the same list is no change.
    assert with_primaries(folder, record, None)["primaries"] == registered["primaries"]
    assert with_primaries(folder, record, ["P:1/16x"])["primaries"] == registered["primaries"]
    with pytest.raises(StudyClash, match="primary findings P:1/16x; --primary F2 would choose"):
        with_primaries(folder, record, ["F2"])
    # A study with results and nothing registered: too late to register.
    (folder / "study.json").write_text(json.dumps(record))
    assert "primaries" not in with_primaries(folder, record, None)
    (folder / "cells").mkdir()
    (folder / "cells" / "c.json").write_text("{}")
    with pytest.raises(StudyClash, match="primary findings none"):
        with_primaries(folder, record, ["P"])


def test_primaries_name_findings_that_exist():
    from analysis.findings import parse_primaries
    from scaling.config import ConfigError

    assert parse_primaries("P:1/16x, F2") == ["P:1/16x", "F2"]
    with pytest.raises(ConfigError, match="--primary.*F5.*P, F1, F2, F3, F4"):
        parse_primaries("P,F5")
    with pytest.raises(ConfigError, match="at least one"):
        parse_primaries(",")


def test_sequential_design_is_capped_by_the_budget_and_stops_when_all_are_decided():
    from scaling.config import ConfigError
    from studies import sequential

    assert sequential.parse_duration("2h30m") == 9000 and sequential.parse_duration("45s") == 45
    for bad in ("", "soon", "2d"):
        with pytest.raises(ConfigError, match="--budget"):
            sequential.parse_duration(bad)
    plan = sequential.design([4.0], 5.0, batch=3, per_replicate_s=60, budget_s=1e9)
    assert plan["looks"] == power.sequential_plan(4.0, 5.0, 1, first=3, batch=3)
    assert sum(plan["levels"]) == pytest.approx(0.05)
    capped = sequential.design([4.0], 5.0, batch=3, per_replicate_s=60, budget_s=7 * 60)
    assert capped["looks"] == [3, 6, 7] and capped["planned"] == plan["looks"][-1]
    assert capped["levels"][-1] < 0.05
    with pytest.raises(ConfigError, match="--budget"):
        sequential.design([4.0], 5.0, batch=3, per_replicate_s=60, budget_s=90)

    def table(verdicts: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"role": "primary", "comparison": [f"c{i}" for i in
                                                               range(len(verdicts))],
                             "verdict": verdicts})

    seen: list[tuple[int, float]] = []
    answers = iter([table(["reproduced", "not decided (x)"]), table(["reproduced", "reversed"]),
                    table(["reproduced", "reversed"])])

    def look(n: int, level: float) -> pd.DataFrame:
        seen.append((n, level))
        return next(answers)

    said: list[str] = []
    found, n = sequential.run_looks(plan, look, said.append, clock=lambda: 0.0)
    assert n == plan["looks"][1] and [s[0] for s in seen] == plan["looks"][:2]
    assert [s[1] for s in seen] == plan["levels"][:2]
    assert "decided at look 2" in said[-1]
    # A budget the next look would overrun stops it, undecided.
    t = iter([0.0, 10_000.0])
    undecided = iter([table(["not decided (x)"])] * 3)
    found, n = sequential.run_looks(plan | {"budget_s": 5_000}, lambda n, lv: next(undecided),
                                    said.append, clock=lambda: next(t))
    assert n == plan["looks"][0] and "stopping undecided" in said[-1]


def test_until_decided_runs_growing_looks_under_one_registered_design(tmp_path, monkeypatch,
                                                                      capsys):
    """The CLI's wiring, with the sweep replaced by one that writes each look's cells
    (P built to be +10 points over the pixel arm): the design is registered once, the
    looks run growing prefixes of the new replicates, and the study stops when P is
    decided at the look's level."""
    import json

    import studies.cli as cli
    from scaling.configure import to_dict
    from scaling.study import sweep
    from scaling.study.folder import check_owner, study_record, with_primaries
    from scaling.study.plan import SHORT, cell_key, cell_stages, cells
    from scaling.study.results import flatten, write_cell
    from studies.model_size import STUDY

    pilot = tmp_path / "pilot.csv"
    pd.DataFrame([{"finding": "P", "comparison": "R18 1/16x at 0.1% labels: fine-tuned - best "
                   "baseline without pretraining", "effect": 8.0, "unit": "pp",
                   "replicates": 3, "_lo": 8.0 - 12.0, "_hi": 8.0 + 12.0}]).to_csv(pilot)
    rng = np.random.default_rng(0)
    looks: list[list[int]] = []

    def fake_run_study(sub, root, **kw):
        study_dir = tmp_path / "S" / sub.name
        record = with_primaries(study_dir, study_record(kw["design"]), kw["primaries"],
                                kw["sequential"])
        check_owner(study_dir, record)
        study_dir.mkdir(parents=True, exist_ok=True)
        (study_dir / "study.json").write_text(json.dumps(record))
        looks.append([int(v) for k, v in sub.axes for v in v if k == "replicate"])
        for c in cells(sub):
            flat = flatten({k: v for k, v in to_dict(c.config).items() if k != "runtime"})
            keys = {s: k for s, k, _ in cell_stages(sub, c)}
            px = 0.6 + rng.normal(0, 0.02)
            top = {"pretrain": None, "finetune": px + 0.10 + rng.normal(0, 0.03),
                   "supervised": px - 0.05, "pixels": px}
            axes = {f"axis.{SHORT.get(k, k)}": v for k, v in c.values}
            rows = [flat | axes | {"study": sub.name, "cell": c.id, "stage": s,
                                   "stage_key": keys[s],
                            "status": "executed", "git_commit": "x", "params": 1000,
                            "top1": t, "val_top1": t, "labelled_examples": 54}
                    for s, t in top.items()]
            write_cell(study_dir, c.id, cell_key(sub, c), rows)
        return sweep.Outcome(pd.DataFrame(), 0, 0, [], 0.0)

    class Est:
        seconds = 60.0

    monkeypatch.setattr(sweep, "run_study", fake_run_study)
    monkeypatch.setattr(cli, "wall_clock", lambda runs: Est())
    monkeypatch.setattr(cli, "checks", lambda study, args: [])
    monkeypatch.setattr(cli, "_report", lambda study_dir, write: True)
    argv = ["--preset", "fmnist-cpu", "--axis", "width=0.0625", "--axis", "label_fraction=0.001",
            "--axis", "replicate=3", "--storage", str(tmp_path / "S"), "--primary", "P",
            "--target-effect", "5", "--pilot", str(pilot), "--until-decided", "--budget", "1h"]
    assert cli.main(STUDY, argv) == 0
    out = capsys.readouterr().out
    spec = json.loads((tmp_path / "S" / "model_size-fmnist-cpu" / "study.json").read_text())
    design = spec["sequential"]
    assert spec["primaries"]["findings"] == ["P"]
    assert design["replicates"][0] == 3 and len(design["replicates"]) == design["looks"][-1]
    assert looks[0] == design["replicates"][:3]  # the first look: the first batch
    assert all(a == b[:len(a)] for a, b in zip(looks, looks[1:], strict=False))  # prefixes
    assert "every primary finding decided" in out and "reproduced" in out
    # The replicates after the deciding look were planned, not missing.
    folder = tmp_path / "S" / "model_size-fmnist-cpu"
    assert len(looks) < len(design["looks"])
    assert collect.missing(spec, collect.load(folder)) == []
