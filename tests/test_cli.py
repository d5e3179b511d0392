"""The study command line as a user meets it (its main(argv), after one real run of
the study): a study folder keeps one configuration's results, and a variant of it
gets its own folder. (Ctrl-C and
resume: tests/test_sweep.py for a study, tests/test_resume.py for the pipeline.)"""

import shutil
import sys

import pandas as pd
import pytest
from study_runs import NAME, ok, run_here

pytest.importorskip("ray")


@pytest.mark.slow
def test_a_variant_run_never_replaces_the_default_studys_results(reference_study, tmp_path):
    """The sequence a user hit: the default study, a variant with other axes and a
    --set on the same storage, then the default again."""
    import ray

    storage = tmp_path / "S"
    shutil.copytree(reference_study.storage, storage)  # the default study, run
    spec, first = reference_study.spec, reference_study.process

    def run(*extra: str):  # the study command, in this process
        return run_here(spec, storage, *extra)

    # A quiet console: the study's own lines, a compact table and the headline.
    for noise in ("Started a local Ray instance", "Token authentication", "Configuration for "
                  "experiment", "View detailed results", "train_seconds", "supervised_top1"):
        assert noise not in first.stdout + first.stderr, noise
    assert "test top-1 %, mean over 1 replicate (columns" in first.stdout
    assert "what pretraining buys" in first.stdout
    # The console ends with the bottom line: every label count, the machine, the time.
    tail = first.stdout[first.stdout.index("bottom line:"):]
    assert "at 10% labels" in tail and "at 50% labels" in tail and "CPU cores" in tail
    import json

    runs = json.loads((storage / NAME / "invocations.json").read_text())
    assert len(runs) == 1 and runs[0]["seconds"] > 0 and runs[0]["cpus"] >= 1
    table = storage / NAME / "results.csv"
    before = pd.read_csv(table)
    assert len(before) == 10  # 2 cells x 5 stages (the pixel arm included)

    variant = ["--axis", "width=0.0625", "--axis", "label_fraction=0.1",
               "--set", "finetune.epochs=2"]
    clash = run(*variant)
    assert clash.returncode == 2, clash.stdout + clash.stderr
    assert f"holds the study '{NAME}' with another configuration" in clash.stderr
    assert "finetune.epochs 3 -> 2" in clash.stderr and "--name" in clash.stderr
    pd.testing.assert_frame_equal(pd.read_csv(table), before)  # untouched

    # --dry-run checks what the run checks and shows what is left of the study.
    assert "9 of 9 stage runs finished" in ok(run("--dry-run"))
    assert run(*variant, "--dry-run").returncode == 2
    plan = ok(run(*variant, "--name", "short-ft", "--dry-run"))
    assert "3 of 5 stage runs finished" in plan and "2 to run" in plan
    assert "estimated time here (cpu): ~" in plan and "H100" not in plan
    assert not (storage / "short-ft").exists()
    try:
        out = ok(run(*variant, "--name", "short-ft"))
    finally:
        ray.shutdown()
    # Its own fine-tuning and distillation; pretraining and the baselines are shared.
    assert "this run: 2 stage runs executed, 3 reused" in out
    short = pd.read_csv(storage / "short-ft" / "results.csv")
    assert len(short) == 5 and set(short["finetune.epochs"]) == {2}

    # The default study is still whole and finished (a dry run: no Ray start-up).
    assert "9 of 9 stage runs finished" in ok(run("--dry-run"))
    pd.testing.assert_frame_equal(pd.read_csv(table), before)
    assert set(before["finetune.epochs"]) == {3}

    # Primary findings are registered before results, never after.
    late = run("--primary", "P", "--dry-run")
    assert late.returncode == 2 and "would choose the test after seeing data" in late.stderr
    bad = run("--primary", "P,F9", "--name", "pre", "--dry-run")
    assert bad.returncode == 2 and "F9" in bad.stderr and "P, F1, F2, F3, F4" in bad.stderr
    plan = ok(run("--primary", "P", "--target-effect", "5", "--name", "pre", "--dry-run",
                  "--pilot", str(storage / NAME)))
    assert "power plan: 2 primary effects" in plan and "one replicate: no spread" in plan
    assert not (storage / "pre").exists()


def test_a_trial_process_ends_quietly_but_other_unraisable_errors_print(capsys, monkeypatch):
    from scaling.study.sweep import quiet_shutdown

    class RaisesWhenCollected:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def __del__(self) -> None:
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", quiet_shutdown)
    RaisesWhenCollected(SystemExit(1))  # what Ray's shutdown of a trial process raises
    assert capsys.readouterr().err == ""
    RaisesWhenCollected(ValueError("a real problem"))
    assert "ValueError: a real problem" in capsys.readouterr().err
