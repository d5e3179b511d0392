"""Studies on Ray Tune, for real: trials run stages on Ray Train, each distinct
stage runs once, and a sweep stopped by Ctrl-C and by a SIGKILL of its driver
resumes to the same table."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import study_runs
import yaml

from scaling.configure import with_overrides
from scaling.study.plan import make_study

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_each_distinct_stage_runs_once_across_concurrent_trials(tiny, tmp_path):
    """2 cells (label fractions) share one pretraining; they start together, one
    trial pretrains while the other trains its supervised baseline, then reuses it."""
    from scaling.study.sweep import run_study

    # Stages in the trial processes (workers=0): what is tested is the claims between
    # trials; Train inside Tune is tested end to end in tests/test_cluster.py.
    base = with_overrides(tiny, {"pretrain.epochs": 1, "finetune.epochs": 1,
                                 "supervised.epochs": 1, "runtime.log_every": 1,
                                 "runtime.workers": 0})
    study = make_study("dedup", base, {"width": [0.0625]})
    try:
        first = run_study(study, tmp_path)
        assert first.errored == []
        df = first.table
        assert len(df) == 10 and set(df["cell"]) == {
            "width=0.0625,label_fraction=0.1", "width=0.0625,label_fraction=0.5"}
        pre = df[df["stage"] == "pretrain"]
        assert pre["stage_key"].nunique() == 1 and sorted(pre["status"]) == ["executed", "reused"]
        # 1 + 2 x (finetune, distill, supervised, pixels)
        assert (first.executed, first.reused) == (9, 1)
        assert (df[df["stage"] != "pretrain"]["status"] == "executed").all()
        assert len(list((tmp_path / "stages").glob("pretrain-*"))) == 1
        assert df["world_size"].eq(1).all() and df["node"].notna().all()
        # supervised_top1 sits beside every row of its cell
        for _, cell in df.groupby("cell"):
            sup = cell.loc[cell["stage"] == "supervised", "top1"].item()
            assert (cell["supervised_top1"] == sup).all()
        on_disk = pd.read_csv(tmp_path / "dedup" / "results.csv")
        assert len(on_disk) == 10 and "model.width" in on_disk and "git_commit" in on_disk
        # The same sweep again: Tune restores it finished; nothing runs.
        again = run_study(study, tmp_path)
        assert (again.executed, again.reused) == (0, 0) and len(again.table) == 10
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_cells_run_in_turn_on_one_lane_and_failures_stay_in_their_cell(tiny, tmp_path):
    """Stages on Ray Train workers (1 worker of 2 CPUs: one lane on this machine):
    both cells run on that lane's one worker group, which Ray Train keeps as one
    run for the whole sweep. The cell whose loss becomes NaN fails alone. The other
    cell's worker is SIGKILLed mid-pretraining: Ray Train restarts the group, which
    takes the same ticket again and resumes pretraining from its checkpoint."""
    import os
    import signal
    import threading

    import psutil

    from scaling.study.sweep import run_study

    base = with_overrides(tiny, {
        "pretrain.epochs": 4, "pretrain.batch_size": 16, "finetune.epochs": 1,
        "supervised.epochs": 1, "distill.epochs": 1, "pretrain.optim.warmup_fraction": 0.0,
        "runtime.checkpoint_every": 4, "runtime.max_failures": 2,
        "runtime.workers": 1, "runtime.cpus_per_worker": 2})
    study = make_study("lanes", base, {"pretrain.optim.base_lr": [1.0e30, 0.1],
                                       "label_fraction": [0.5]})
    killed: list[int] = []

    def kill_mid_pretraining() -> None:
        deadline = time.monotonic() + 300
        while not any(tmp_path.glob("stages/pretrain-*/checkpoints/step-*")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        for proc in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)

    killer = threading.Thread(target=kill_mid_pretraining, daemon=True)
    killer.start()
    try:
        out = run_study(study, tmp_path)
    finally:
        ray.shutdown()
    killer.join(timeout=1)
    assert killed, "no Ray Train worker was found to kill"
    assert len(out.errored) == 1 and "1e+30" in out.errored[0], out.errored
    good, bad = out.table[out.table["cell"] != out.errored[0]], out.table[
        out.table["cell"] == out.errored[0]]
    assert sorted(good["stage"]) == ["distill", "finetune", "pixels", "pretrain", "supervised"]
    assert (good["status"] == "executed").all() and good["top1"].notna().sum() == 4
    assert good["world_size"].eq(1).all() and good["node"].notna().all()
    # The baselines do not depend on pretraining: the failed cell may reuse them
    # (whether it gets to them before its own pretraining fails depends on timing).
    assert set(bad["stage"]) <= {"supervised", "pixels"} and (bad["status"] == "reused").all()
    pre = yaml.safe_load(next(tmp_path.glob("stages/pretrain-*/result.json")).read_text())
    protocol = pre["protocol"]  # every epoch's steps were done, once
    assert pre["step"] == 4 * (protocol["images"] // 16) and protocol["epochs"] == 4, pre
    assert pre["resumed_from"] is not None and 4 <= pre["resumed_from"] < pre["step"], pre
    # One TorchTrainer run (one worker group, restarted once in place) ran every
    # stage of both cells.
    runs = [p.name for p in (tmp_path / "lanes" / "_train").iterdir()]
    assert len(runs) == 1 and runs[0].startswith("lane-0-") and runs[0].endswith("-1"), runs
    nan = next((tmp_path / "stages").glob("pretrain-*/error.json"))
    assert "loss became nan" in nan.read_text()


def _metrics(storage: Path) -> pd.DataFrame:
    df = pd.read_csv(storage / study_runs.NAME / "results.csv")
    cols = ["cell", "stage", "stage_key", "step", "top1", "linear_top1", "knn_top1"]
    return df[cols].sort_values(["cell", "stage"], ignore_index=True)


@pytest.mark.slow
def test_an_interrupted_study_resumes_to_the_uninterrupted_result(reference_study, tmp_path,
                                                                 monkeypatch):
    """The study is stopped twice, as a user and as a crash would: Ctrl-C in the middle
    of pretraining (exit 130, one line saying how to resume, no traceback), then a
    SIGKILL of its driver in the middle of fine-tuning. The same command then
    finishes, and its table equals that of the same study nobody interrupted. Its
    curves reach TensorBoard and MLflow whole, each point once."""
    from study_runs import command, ok, orphans_gone, ray_workers, run, start, wait_until

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3, this process too
    storage = tmp_path / "S"
    cmd = command(reference_study.spec, storage, "--mlflow", f"file://{tmp_path}/mlruns")
    stages = storage / "stages"
    study = storage / study_runs.NAME

    # 1. Ctrl-C in the middle of pretraining; meanwhile, watch it from another terminal.
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: any(stages.glob("pretrain-*/checkpoints/step-*")), proc,
               what="pretraining's first checkpoint")
    watched = run([sys.executable, "-m", "scaling.study.watch", str(study), "--ray"])
    assert proc.poll() is None, "the study ended before the interrupt"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    finished = len(list(stages.glob("*/result.json")))
    assert err.strip().splitlines()[-1] == (
        f"interrupted after {finished}/9 stage runs; run the same command to resume")
    for noise in ("Tuner.restore", "results table:", "Traceback", "KeyboardInterrupt"):
        assert noise not in out + err, noise
    seen = ok(watched)
    assert f"study {study_runs.NAME}: " in seen and "/9 stage runs finished" in seen
    assert "running, checkpoint at step" in seen and "tensorboard --logdir" in seen
    assert "Resources" in seen and "CPU" in seen  # ray status, authenticated
    pre = next(stages.glob("pretrain-*"))
    assert not (pre / "result.json").exists()
    killed_at = max(int(p.name[5:]) for p in (pre / "checkpoints").glob("step-*"))

    # 2. SIGKILL of the driver in the middle of a fine-tuning (pretraining finished,
    # resumed from its checkpoint).
    ray_before = set(ray_workers())
    proc = start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (pre / "result.json").exists()
               and any(stages.glob("finetune-*/checkpoints/step-*")), proc,
               what="a fine-tuning checkpoint")
    # A second invocation of the running study stops in one line naming the first
    # (issue 37: it joined the first's Ray and drove the same Tune experiment).
    second = run(cmd)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"is running: driver pid {proc.pid}" in second.stderr and "--wait" in second.stderr
    assert "Traceback" not in second.stderr and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphans_gone(ray_before)  # its trial notices the driver is gone, and ends
    assert (study / "driver.json").exists()  # the killed driver's lease stays behind
    resumed = yaml.safe_load((pre / "result.json").read_text())
    assert resumed["resumed_from"] is not None and resumed["resumed_from"] >= killed_at

    # 3. The same command finishes what is left.
    done = run(cmd)
    out = ok(done)
    assert "resuming the sweep" in out, out[-3000:]
    assert f"(pid {proc.pid} on" in done.stderr and "taking over" in done.stderr
    assert not (study / "driver.json").exists()  # released at the end
    assert "Traceback" not in out + done.stderr and "Exception ignored" not in out + done.stderr
    # Each progress line once, from the sweep's driver; one whole-sweep line per stage run.
    assert "(run_cell pid=" not in out and "repeated" not in out
    assert "[sweep] 9/9 stage runs, done" in out
    got, want = _metrics(storage), _metrics(reference_study.storage)
    assert len(got) == 10
    pd.testing.assert_frame_equal(got, want, rtol=1e-6)
    # Each distinct stage was computed into exactly one directory.
    assert len(list(stages.glob("pretrain-*"))) == 1
    assert len(list(stages.glob("finetune-*"))) == 2
    check_curves(study, tmp_path / "mlruns")


def check_curves(study: Path, mlruns: Path) -> None:
    """TensorBoard and MLflow hold each stage's own curve on its own step axis: every
    point of the stored history once, and the stage's final metrics; curves.csv holds
    every stage run of the table."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pre = yaml.safe_load(next(study.parent.glob("stages/pretrain-*/result.json")).read_text())
    want = [(p["step"], pytest.approx(p["loss"], rel=1e-6)) for p in pre["history"]]
    assert len(want) > 4
    curves = pd.read_csv(study / "curves.csv", dtype={"lr": str}, keep_default_na=False)
    table = pd.read_csv(study / "results.csv")
    assert set(curves["stage_key"]) == set(table["stage_key"])
    runs = sorted((study / "tensorboard").iterdir())
    assert [r.name for r in runs] == ["depth=18,width=0.0625,label_fraction=0.1",
                                      "depth=18,width=0.0625,label_fraction=0.5"]
    events = EventAccumulator(str(runs[1]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"pretrain/loss", "pretrain/lr", "pretrain/knn_val_top1", "finetune/loss",
            "finetune/val_top1", "distill/loss", "supervised/test_top1"} <= tags
    assert [(e.step, e.value) for e in events.Scalars("pretrain/loss")] == want
    # The cell's axes as hparams: TensorBoard's HParams tab filters by them.
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    client = mlflow.MlflowClient(f"file://{mlruns}")
    found = client.search_runs([client.get_experiment_by_name(study.name).experiment_id])
    # The interrupted invocations' runs stay, unfinished; the last one is complete.
    done = [r for r in found if r.info.status == "FINISHED"]
    assert sorted(r.data.params["label_fraction"] for r in done) == ["0.1", "0.5"]
    history = client.get_metric_history(done[0].info.run_id, "pretrain/loss")
    assert sorted((m.step, m.value) for m in history) == want
    assert "finetune/val_top1" in done[0].data.metrics


@pytest.mark.slow
def test_failed_cells_stay_failed_until_restart_errored(tmp_path, capsys):
    """A cell whose loss becomes NaN fails alone; re-running resumes without it
    (exit 1, its stage not started), and --restart-errored runs it again. The study
    command's main(argv), three times in this process on one Ray session."""
    from studies import model_size
    from studies.cli import main

    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({
        "preset": "quick", "base": str(REPO / "configs" / "tiny.yaml"),
        "axes": {"width": [0.0625], "pretrain.optim.base_lr": [0.1, 1.0e30],
                 "label_fraction": [0.5]},
        "set": {"pretrain.epochs": 1, "finetune.epochs": 1, "supervised.epochs": 1,
                "distill.epochs": 1, "pretrain.optim.warmup_fraction": 0.0,
                "runtime.device": "cpu", "runtime.workers": 0},
    }))
    argv = ["--file", str(spec), "--storage", str(tmp_path / "s"), "--no-report"]

    def run(*extra: str) -> tuple[int, str]:
        code = main(model_size.STUDY, [*argv, *extra])
        return code, capsys.readouterr().out

    try:
        code, out = run()
        assert code == 1, out[-3000:]
        failed = [line for line in out.splitlines() if line.startswith("1 cells failed: ")]
        assert len(failed) == 1 and "pretrain.optim.base_lr=1e+30" in failed[0], out
        bad = failed[0].removeprefix("1 cells failed: ").split(";")[0]
        table = pd.read_csv(tmp_path / "s" / "model_size-quick" / "results.csv")
        assert set(table["stage"]) == {"pretrain", "finetune", "distill", "supervised", "pixels"}
        # The good cell finished. The bad one computed nothing: the baselines do not
        # depend on pretraining, so it may have reused them (timing decides).
        rows = table[table["cell"] == bad]
        assert set(rows["stage"]) <= {"supervised", "pixels"} and (rows["status"] == "reused").all()
        code, out = run()
        assert code == 1 and "resuming the sweep" in out
        assert f"[{bad}] pretrain: start" not in out  # left failed, not re-run
        code, out = run("--restart-errored")
        assert code == 1
        assert f"[{bad}] pretrain: start" in out  # run again (and failed again)
    finally:
        ray.shutdown()
