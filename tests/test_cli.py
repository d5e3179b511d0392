"""The study and pipeline command lines as a user meets them, in real processes:
a study folder keeps one configuration's results, Ctrl-C stops with exit 130 and
says how to resume, and the same command then finishes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parent.parent
# MLflow 3 keeps its file store only on request; the test needs no server.
ENV = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
TINY = {"pretrain.epochs": 2, "finetune.epochs": 3, "supervised.epochs": 2,
        "runtime.device": "cpu", "runtime.workers": 0, "runtime.log_every": 4}


def study_command(tmp_path: Path, storage: Path, axes: dict, **extra) -> list[str]:
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({"preset": "quick", "base": str(REPO / "configs" / "tiny.yaml"),
                                    "axes": axes, "set": {**TINY, **extra}}))
    return [sys.executable, "studies/model_size.py", "--file", str(spec), "--storage",
            str(storage), "--no-report"]


def run(command: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=ENV)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_a_variant_run_never_replaces_the_default_studys_results(tmp_path):
    """The sequence a user hit: the default study, a variant with other axes and a
    --set on the same storage, then the default again."""
    storage = tmp_path / "S"
    default = study_command(tmp_path, storage, {"width": [0.0625], "label_fraction": [0.1, 0.5]})
    first = run(default)
    ok(first)
    # A quiet console: the study's own lines, a compact table and the headline.
    for noise in ("Started a local Ray instance", "Token authentication", "Configuration for "
                  "experiment", "View detailed results", "train_seconds", "supervised_top1"):
        assert noise not in first.stdout + first.stderr, noise
    assert "test top-1 %, mean over 1 replicate (columns" in first.stdout
    assert "what pretraining buys" in first.stdout
    table = storage / "model_size-quick" / "results.csv"
    before = pd.read_csv(table)
    assert len(before) == 10  # 2 cells x 5 stages (the pixel arm included)

    variant = ["--axis", "width=0.0625", "--axis", "label_fraction=0.1",
               "--set", "finetune.epochs=2"]
    clash = run(default, *variant)
    assert clash.returncode == 2, clash.stdout + clash.stderr
    assert "holds the study 'model_size-quick' with another configuration" in clash.stderr
    assert "finetune.epochs 3 -> 2" in clash.stderr and "--name" in clash.stderr
    pd.testing.assert_frame_equal(pd.read_csv(table), before)  # untouched

    # --dry-run checks what the run checks and shows what is left of the study.
    assert "9 of 9 stage runs finished" in ok(run(default, "--dry-run"))
    assert run(default, *variant, "--dry-run").returncode == 2
    plan = ok(run(default, *variant, "--name", "short-ft", "--dry-run"))
    assert "3 of 5 stage runs finished" in plan and "2 to run" in plan
    assert "estimated time here (cpu): ~" in plan and "H100" not in plan
    assert not (storage / "short-ft").exists()
    out = ok(run(default, *variant, "--name", "short-ft"))
    # Its own fine-tuning and distillation; pretraining and the baselines are shared.
    assert "this run: 2 stage runs executed, 3 reused" in out
    short = pd.read_csv(storage / "short-ft" / "results.csv")
    assert len(short) == 5 and set(short["finetune.epochs"]) == {2}

    # The default study is still whole and finished (a dry run: no Ray start-up).
    assert "9 of 9 stage runs finished" in ok(run(default, "--dry-run"))
    pd.testing.assert_frame_equal(pd.read_csv(table), before)
    assert set(before["finetune.epochs"]) == {3}


def _interrupt_when(command: list[str], ready, timeout: float = 300,
                    meanwhile=lambda: None) -> subprocess.Popen:
    """Start ``command`` in its own process group and Ctrl-C it (SIGINT to the whole
    group, as a terminal does) as soon as ``ready()``, after calling ``meanwhile()``."""
    # A terminal's child gets SIGINT's default action. An ignored SIGINT would be
    # inherited through exec, and Python installs no KeyboardInterrupt handler then.
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "interrupt point never reached"
        time.sleep(0.05)
    # The command must still be running: else the window was missed, not the signal.
    assert proc.poll() is None, ("ended before the interrupt point was seen", proc.communicate())
    meanwhile()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    return proc


@pytest.mark.slow
def test_ctrl_c_on_a_study_exits_130_and_the_same_command_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    storage = tmp_path / "S"
    command = study_command(tmp_path, storage, {"width": [0.0625], "label_fraction": [0.5]},
                            **{"pretrain.epochs": 12, "runtime.checkpoint_every": 4})
    command += ["--mlflow", f"file://{tmp_path}/mlruns"]
    watched = []

    def watch() -> None:  # from another terminal, while the study runs
        watched.append(run([sys.executable, "-m", "scaling.study.watch",
                            str(storage / "model_size-quick"), "--ray"]))

    proc = _interrupt_when(command, lambda: any(
        storage.glob("stages/pretrain-*/checkpoints/step-*")), meanwhile=watch)
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    finished = len(list(storage.glob("stages/*/result.json")))
    assert err.strip().splitlines()[-1] == (
        f"interrupted after {finished}/5 stage runs; run the same command to resume")
    for noise in ("Tuner.restore", "results table:", "Traceback", "KeyboardInterrupt"):
        assert noise not in out + err, noise
    seen = ok(watched[0])
    assert "study model_size-quick: " in seen and "/5 stage runs finished" in seen
    assert "running, checkpoint at step" in seen and "tensorboard --logdir" in seen
    assert "Resources" in seen and "CPU" in seen  # ray status, authenticated

    resumed = run(command)
    out = ok(resumed)
    assert "resuming the sweep" in out, out[-3000:]
    assert "resumed from step" in out, out[-3000:]
    assert "Traceback" not in out + resumed.stderr
    assert "Exception ignored" not in out + resumed.stderr
    # Each progress line once, from the sweep's driver; one whole-sweep line per stage run.
    assert "(run_cell pid=" not in out and "repeated" not in out
    assert "[sweep] 5/5 stage runs, done" in out
    assert len(pd.read_csv(storage / "model_size-quick" / "results.csv")) == 5
    check_curves(storage / "model_size-quick", tmp_path / "mlruns")


def check_curves(study: Path, mlruns: Path) -> None:
    """TensorBoard and MLflow hold each stage's own curve on its own step axis: every
    point of the stored history once, and the stage's final metrics."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pre = yaml.safe_load(next(study.parent.glob("stages/pretrain-*/result.json")).read_text())
    want = [(p["step"], pytest.approx(p["loss"], rel=1e-6)) for p in pre["history"]]
    assert len(want) > 4
    runs = list((study / "tensorboard").iterdir())
    assert [r.name for r in runs] == ["depth=18,width=0.0625,label_fraction=0.5"]
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"pretrain/loss", "pretrain/lr", "pretrain/knn_val_top1", "finetune/loss",
            "finetune/val_top1", "distill/loss", "supervised/test_top1"} <= tags
    assert [(e.step, e.value) for e in events.Scalars("pretrain/loss")] == want
    client = mlflow.MlflowClient(f"file://{mlruns}")
    runs = client.search_runs([client.get_experiment_by_name("model_size-quick").experiment_id])
    # The interrupted invocation's run stays, unfinished; the resumed one is complete.
    (run,) = [r for r in runs if r.info.status == "FINISHED"]
    assert run.data.params["label_fraction"] == "0.5"
    history = client.get_metric_history(run.info.run_id, "pretrain/loss")
    assert sorted((m.step, m.value) for m in history) == want
    assert "finetune/val_top1" in run.data.metrics


@pytest.mark.slow
def test_ctrl_c_on_the_pipeline_exits_130_and_the_same_command_resumes(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.update(label_fractions=[0.5], runtime={"device": "cpu", "checkpoint_every": 2})
    cfg["pretrain"]["epochs"] = 12  # a window of seconds: a full run once beat the poll
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "scaling.pipeline", str(path), "--out", str(tmp_path)]
    proc = _interrupt_when(command, lambda: any(
        tmp_path.glob("tiny/pretrain-*/checkpoints/step-*")))
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "interrupted after 0/5 stage runs; run the same command to resume"]
    out = ok(run(command))
    assert "resumed from step" in out and "5 stage results" in out


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
