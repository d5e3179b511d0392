"""Study planning without Ray: grids, stage dedup counts, validation, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from scaling.config import ConfigError
from scaling.configure import with_overrides
from scaling.study.plan import cells, make_study, plan, schedule_order, stage_flops
from studies.cli import main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "studies"))
import distillation  # noqa: E402
import head_depth  # noqa: E402
import model_size  # noqa: E402


def test_grid_expands_aliases_and_defaults_the_fraction_axis(tiny):
    study = make_study("s", tiny, {"width": [0.0625, 0.125], "depth": [18]})
    grid = cells(study)
    assert [c.id for c in grid] == [
        "width=0.0625,depth=18,label_fraction=0.1", "width=0.0625,depth=18,label_fraction=0.5",
        "width=0.125,depth=18,label_fraction=0.1", "width=0.125,depth=18,label_fraction=0.5"]
    c = grid[1].config
    assert (c.model.width, c.finetune.label_fraction, c.label_fractions) == (0.0625, 0.5, ())


def test_each_distinct_stage_is_counted_once(tiny):
    # 2 models x 3 fractions: pretraining per model, everything else per cell.
    p = plan(make_study("s", tiny, {"width": [0.0625, 0.125], "label_fraction": [0.1, 0.5, 1.0]}))
    # The pixel arm: once per fraction, whatever the model.
    assert p.distinct == {"pretrain": 2, "finetune": 6, "distill": 6, "supervised": 6,
                          "pixels": 3}
    assert (p.stage_runs, p.naive_stage_runs) == (23, 30)
    # Students share their teacher's pretraining and fine-tuning.
    p = plan(make_study("s", tiny, {"student_width": [0.0625, 0.125], "label_fraction": [0.5]}))
    assert p.distinct == {"pretrain": 1, "finetune": 1, "distill": 2, "supervised": 1,
                          "pixels": 1}
    # The head's depth changes pretraining, the fine-tune layer only fine-tuning, and
    # neither the supervised baseline; a study without distillation never plans it.
    p = plan(make_study("s", tiny, {"head_depth": [2, 3], "ft_layer": [0, 1]},
                        ("pretrain", "finetune", "supervised")))
    assert p.distinct == {"pretrain": 2, "finetune": 8, "supervised": 2}
    assert p.flops > 0


def test_independent_replicates_share_no_stage_run(tiny):
    """Replicate r draws its own pretraining seed, labelled subset and fine-tuning seed:
    across replicates no stage run is shared; the crossed design shares pretraining."""
    from scaling.stages.registry import stage_key

    study = make_study("s", tiny, {"width": [0.0625, 0.125], "label_fraction": [0.1, 0.5],
                                   "replicate": [0, 1, 2]})
    runs: dict[int, set[tuple[str, str]]] = {}
    for cell in cells(study):
        r = dict(cell.values)["replicate"]
        c = cell.config
        assert (c.seed, c.finetune.subset_seed) == (r, r)
        runs.setdefault(r, set()).update((s, stage_key(c, s)) for s in study.stages)
    assert all(runs[a].isdisjoint(runs[b]) for a in runs for b in runs if a < b)
    crossed = make_study("s", tiny, {"seed": [0, 1], "subset_seed": [0, 1]})
    assert plan(crossed).distinct["pretrain"] == 2  # 4 cells, 2 pretraining runs
    with pytest.raises(ConfigError, match="no seed or subset_seed axis beside a replicate"):
        make_study("s", tiny, {"replicate": [0, 1], "seed": [0]})
    with pytest.raises(ConfigError, match="integers >= 0"):
        make_study("s", tiny, {"replicate": [0.5]})


def test_student_axes_start_from_the_teachers_architecture(tiny):
    study = make_study("s", tiny, {"width": [0.125], "student_width": [0.0625]})
    student = cells(study)[0].config.distill.student
    assert (student.depth, student.width) == (tiny.model.depth, 0.0625)


def test_schedule_interleaves_cells_that_share_pretraining_longest_first(tiny):
    study = make_study("s", tiny, {"width": [0.0625, 0.125], "label_fraction": [0.1, 0.5]})
    order = [(c.config.model.width, c.config.finetune.label_fraction)
             for c in schedule_order(study, cells(study))]
    # The wider model and the larger label fraction cost most.
    assert order == [(0.125, 0.5), (0.0625, 0.5), (0.125, 0.1), (0.0625, 0.1)]


@pytest.mark.parametrize("axes, key, text", [
    ({"dept": [18]}, "axes.dept", "an axis: one of depth"),
    ({"runtime.workers": [2]}, "axes.runtime.workers", "an axis"),
    ({"depth": [37]}, "model.depth", "one of [18, 34, 50, 101, 152, 200]"),
    ({"label_fraction": [0.0]}, "finetune.label_fraction", "(0, 1]"),
    ({"label_fraction": [1.5]}, "finetune.label_fraction", "(0, 1]"),
    ({"width": [0]}, "model.width", "0 < width"),
    ({"width": [-1.0]}, "model.width", "0 < width"),
    ({"head_depth": [0]}, "head.num_layers", "1..5"),
    ({"width": []}, "axes.width", "non-empty"),
    ({"width": [0.125, 0.125]}, "axes.width", "distinct"),
])
def test_impossible_axes_are_rejected_naming_key_value_and_allowed(tiny, axes, key, text):
    with pytest.raises(ConfigError) as e:
        make_study("s", tiny, axes)
    assert e.value.key == key and text in str(e.value)


def test_more_workers_than_the_cluster_holds_is_rejected(tiny):
    from scaling.study.sweep import capacity

    with pytest.raises(ConfigError, match="runtime.workers=3 .*cluster's 2 CPUs"):
        capacity(with_overrides(tiny, {"runtime.workers": 3}), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="GPUs"):
        capacity(with_overrides(tiny, {"runtime.gpus_per_worker": 1}), {"CPU": 8.0})
    # 2 cores: two one-worker trials train at once, drivers on their own resource.
    cap = capacity(tiny, {"CPU": 2.0, "TRAIN_DRIVER": 1000.0})
    assert cap.concurrent == 2 and cap.resources == {"TRAIN_DRIVER": 1}
    cap = capacity(with_overrides(tiny, {"runtime.workers": 0}), {"CPU": 2.0})
    assert cap.concurrent == 2 and cap.resources == {"CPU": 1}
    cap = capacity(with_overrides(tiny, {"runtime.workers": 4, "runtime.gpus_per_worker": 1}),
                   {"CPU": 32.0, "GPU": 8.0})
    assert cap.concurrent == 2


@pytest.mark.parametrize("module, preset", [
    (m, p) for m in (model_size, head_depth, distillation) for p in m.STUDY.presets])
def test_every_preset_of_every_study_plans(module, preset, capsys, monkeypatch, tmp_path):
    # Planning, not timing: a fixed speed instead of measuring every model of every
    # preset (scaling.study.estimate is measured in test_cli's dry runs).
    monkeypatch.setattr("scaling.study.estimate.training_rate", lambda *args: 5e9)
    # Nor the data roots (the GPU presets' live on cluster nodes) and the memory plan
    # (a second a footprint; tests/test_footprint.py runs it for the GPU presets).
    monkeypatch.setattr("studies.cli.root_problem", lambda *args: None)
    monkeypatch.setattr("scaling.study.memory.memory_plan", lambda study: [])
    # An empty storage: a user's finished runs/ would leave nothing to estimate.
    assert main(module.STUDY, ["--preset", preset, "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "distinct" in out and "a naive grid would run" in out
    # GPU presets: assumed H100-hours; CPU presets: time measured on this machine.
    assert ("H100-hours" if "gpu" in preset else "estimated time here (cpu)") in out


def test_cli_overrides_axes_seeds_and_files(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("preset: quick\naxes: {width: [0.0625]}\nset: {pretrain.epochs: 1}\n")
    assert main(model_size.STUDY, ["--file", str(spec), "--axis", "label_fraction=0.1",
                                   "--repeats", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 cells" in out and "seed             0, 1, 2" in out
    # Every seed is its own model; the labelled subset, and so the pixel arm, is shared.
    assert "stage runs: 13 distinct" in out and "pixels 1" in out
    assert main(model_size.STUDY, ["--file", str(spec), "--axis", "label_fraction=0.1",
                                   "--replicates", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "replicate        0, 1, 2" in out and "stage runs: 15 distinct" in out


@pytest.mark.parametrize("args, text", [
    (["--axis", "depth=37"], "model.depth=37 is invalid"),
    (["--axis", "label_fraction=0"], "finetune.label_fraction=0.0 is invalid"),
    (["--axis", "head_depth=0"], "head.num_layers=0 is invalid"),
    (["--axis", "colour=1"], "axes.colour=[1] is invalid"),
    (["--preset", "huge"], "--preset='huge' is invalid; allowed: local, quick, fmnist-cpu"),
    (["--set", "runtime.workers=64"], "runtime.workers=64 is invalid"),
    # A mistyped storage with --resume: refused before Ray starts, nothing created.
    (["--resume"], "no sweep state in"),
])
def test_bad_input_exits_2_before_any_ray_work(tmp_path, capsys, args, text):
    import ray

    started = ray.is_initialized()
    assert main(model_size.STUDY, ["--storage", str(tmp_path / "s"), *args]) == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing started, nothing written
    assert ray.is_initialized() == started


def test_bad_input_in_a_real_process_exits_2_with_one_line(tmp_path):
    """The command as a shell runs it: exit status 2, the message on stderr, no
    traceback (the in-process cases above go through the same main)."""
    run = subprocess.run([sys.executable, "studies/model_size.py", "--storage",
                          str(tmp_path / "s"), "--axis", "depth=37"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "model.depth=37 is invalid" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "s").exists()


def test_a_stage_lease_held_by_a_dead_trial_runs_out():
    """A trial that dies holding a stage stops renewing; after the lease time a
    waiting trial takes the stage over. A live holder keeps it by renewing."""
    from scaling.study.coordinator import Leases

    now = [0.0]
    leases = Leases(seconds=60, clock=lambda: now[0])
    assert leases.claim("pretrain-a", "t1") and not leases.claim("pretrain-a", "t2")
    now[0] = 50
    leases.renew("pretrain-a", "t1")
    now[0] = 100
    assert not leases.claim("pretrain-a", "t2")  # renewed at 50: still held
    leases.renew("pretrain-a", "t2")  # only the holder renews
    now[0] = 111
    assert leases.claim("pretrain-a", "t2")  # t1 silent for 61 s: taken over
    leases.release("pretrain-a", "t1")  # the old holder cannot release it any more
    assert not leases.claim("pretrain-a", "t3")
    leases.release("pretrain-a", "t2")
    assert leases.claim("pretrain-a", "t3")


def test_idle_speeds_are_cached_and_busy_ones_are_used_once_and_said(tiny, monkeypatch, tmp_path):
    from scaling.study import estimate

    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path))
    timed: list[str] = []

    def rate(model, data, size, device, batch):
        timed.append(f"{model.width}@{batch}")
        return 1e9 * (1 + model.width)

    monkeypatch.setattr(estimate, "training_rate", rate)
    runs = [("pretrain", tiny), ("finetune", tiny), ("pixels", tiny),
            ("pretrain", with_overrides(tiny, {"model.width": 0.5}))]
    monkeypatch.setattr(estimate, "_load_per_core", lambda: 1.5)  # busy: used, not kept
    busy = estimate.wall_clock(runs)
    assert not estimate.cache_file().exists() and busy.cached == 0
    assert "busy (load 1.50 a core)" in busy.provenance()
    monkeypatch.setattr(estimate, "_load_per_core", lambda: 0.05)
    idle = estimate.wall_clock(runs)
    assert idle.seconds == pytest.approx(busy.seconds, rel=1e-12) and len(timed) == 6
    assert "3 measured just now" in idle.provenance() and estimate.cache_file().exists()
    again = estimate.wall_clock(runs)  # nothing timed: every speed from the cache
    assert len(timed) == 6 and again.cached == 3 and again.seconds == idle.seconds
    assert again.provenance().startswith("speeds: 3 cached from an idle machine")
    # Closed form: each run's FLOPs over its model's rate, summed.
    want = sum(stage_flops(c, s) / (1e9 * (1 + c.model.width)) for s, c in runs if s != "pixels")
    assert again.seconds == pytest.approx(want, rel=1e-12)


def test_the_sweep_eta_starts_at_the_estimate_and_moves_to_the_measured_rate(monkeypatch):
    from scaling.study import console

    now = [1000.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    flops = {("pretrain", "a"): 100.0, ("finetune", "b"): 300.0, ("pretrain", "c"): 50.0}
    c = console.Console("unused", [], flops, {("pretrain", "c")}, estimate_s=400.0)
    assert c.sweep_line() == "[sweep] 1/3 stage runs, ETA 6m40s"  # the estimate itself
    # 200 s later pretrain "a" (100 FLOPs) has finished: a weight-1/4 prior of
    # (100 s, 100 FLOPs) plus (200 s, 100 FLOPs) measured: 300 FLOPs left at 2/3 a second.
    now[0] += 200.0
    c.executed_flops += 100.0
    c.done.add(("pretrain", "a"))
    assert c.sweep_line() == "[sweep] 2/3 stage runs, ETA 7m30s"
    bare = console.Console("unused", [], flops, set())  # no estimate: as before
    assert bare.sweep_line() == "[sweep] 0/3 stage runs, ETA after the first stage run"


def test_the_cost_table_in_docs_is_what_the_dry_run_computes():
    from scaling.study import cluster
    from scaling.study.cost import on_cluster
    from studies.cli import cost_table

    repo = Path(__file__).resolve().parents[1]
    config = cluster.load(repo / "cluster" / "gpu.yaml")
    table = cost_table([model_size.STUDY, head_depth.STUDY, distillation.STUDY], config)
    assert table in (repo / "docs" / "cluster.md").read_text()  # one source of truth
    # Closed form: 16 A100-hours of work (312 TFLOP/s at 40%), 2 lanes of 4 GPUs.
    flops = 3600 * 0.4 * 312e12 * 16  # 16 A100-hours
    c = on_cluster(flops, flops / 8, 4, 2, [("a", "p4de.24xlarge", 8)], 8, price=3.0)
    assert c.gpu_hours == pytest.approx(16) and c.gpus_at_once == 8
    assert c.hours == pytest.approx(max(16 / 8, 2 / 4)) and c.cost == pytest.approx(48)
    assert on_cluster(flops, flops, 1, 1, [("x", "g5.xlarge", 1)], 1, None) is None  # unknown


def test_an_unknown_stage_is_an_error_not_another_stages_formula(tiny):
    with pytest.raises(ValueError, match="stage='probe'; allowed: pretrain, finetune"):
        stage_flops(tiny, "probe")
    assert stage_flops(tiny, "distill") > 0
