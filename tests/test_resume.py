"""Kill and interrupt a real pipeline process mid-way, start it again, and check it
resumed to the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scaling.stage_result import load_final_models, read_local_result
from scaling.stages.checkpoint import latest_checkpoint
from scaling.stages.registry import run as run_stage

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, **extra) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["label_fractions"] = [0.5]
    cfg["pretrain"]["epochs"] = 6
    cfg["data"]["val_size"] = 0  # all 256 images: 8 steps an epoch
    cfg["runtime"] = {"device": "cpu", "checkpoint_every": 2, "log_every": 2}
    cfg.update(extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(cfg: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "scaling.pipeline", str(cfg), "--out", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # Ctrl-C's default action, whatever this process does with SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_checkpoint(pre_glob, min_step: int, proc: subprocess.Popen, timeout=120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name.split("-")[1]) for p in pre_glob()]
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


@pytest.mark.slow
def test_a_killed_then_interrupted_pipeline_resumes_to_the_uninterrupted_models(tmp_path):
    """SIGKILL in the middle of pretraining (nothing cleans up), then Ctrl-C in the
    middle of the resumed pretraining (exit 130, one line saying how to resume): the
    same command finishes from the last checkpoint, with the weights of a run nobody
    interrupted, and a fourth run retrains nothing."""
    cfg = write_config(tmp_path)
    killed_root = tmp_path / "killed"

    def checkpoints():
        return list(killed_root.glob("tiny/pretrain-*/checkpoints/step-*"))

    proc = start(cfg, killed_root)
    wait_for_checkpoint(checkpoints, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pre_dir = next(killed_root.glob("tiny/pretrain-*"))
    assert read_local_result(pre_dir) is None  # killed before the end of the stage
    _, meta = latest_checkpoint(pre_dir)
    killed_at = meta["step"]
    assert 6 <= killed_at < 48

    second = start(cfg, killed_root)
    interrupted_at = wait_for_checkpoint(checkpoints, killed_at + 4, second)
    second.send_signal(signal.SIGINT)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 130, out
    assert f"[pretrain] resumed from step {killed_at}" in out
    assert out.strip().splitlines()[-1] == (
        "interrupted after 0/5 stage runs; run the same command to resume")
    assert "Traceback" not in out

    third = start(cfg, killed_root)
    out, _ = third.communicate(timeout=600)
    assert third.returncode == 0, out
    result = read_local_result(pre_dir)
    assert f"[pretrain] resumed from step {result['resumed_from']}" in out
    assert result["step"] == 48 and result["resumed_from"] >= interrupted_at
    assert [p["step"] for p in result["history"]] == list(range(2, 49, 2))
    assert "5 stage results" in out

    # The same command never interrupted gives the same weights: batch order,
    # augmentation RNG, optimiser and model state all came back exactly.
    clean = start(cfg, tmp_path / "clean")
    out_clean, _ = clean.communicate(timeout=600)
    assert clean.returncode == 0, out_clean
    clean_dir = next((tmp_path / "clean").glob("tiny/pretrain-*"))
    assert clean_dir.name == pre_dir.name
    a, b = load_final_models(pre_dir), load_final_models(clean_dir)
    for key, value in a["encoder"].items():
        want = b["encoder"][key].float()
        assert (value.float() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max()), key

    # A fourth run of the finished pipeline retrains nothing.
    fourth = start(cfg, killed_root)
    out4, _ = fourth.communicate(timeout=600)
    assert fourth.returncode == 0 and "resumed" not in out4 and "step" not in out4.split("\n")[0]


def test_corrupt_latest_checkpoint_falls_back_to_previous(tiny, tmp_path, capsys):
    from scaling.configure import with_overrides

    cfg = with_overrides(tiny, {"pretrain.epochs": 1, "runtime.checkpoint_every": 2,
                                "runtime.keep_checkpoints": 3, "data.val_size": 0})
    out = tmp_path / "pre"
    run_stage("pretrain", cfg, out)
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in steps] == ["step-000000004", "step-000000006", "step-000000008"]
    state_file = steps[-1] / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:1000])  # truncated
    _, meta = latest_checkpoint(out)
    assert meta["step"] == 6
    assert "step-000000008: state.pt does not match its sha256" in capsys.readouterr().err
    # A corrupt result model is refused, not silently loaded.
    (out / "final" / "model.pt").write_bytes(b"garbage")
    import pytest

    from scaling.stage_result import CheckpointError
    with pytest.raises(CheckpointError, match="sha256: the stage is unfinished"):
        load_final_models(out)  # its result.json is set aside: the stage runs again
    assert "model.pt does not match its result.json's sha256" in capsys.readouterr().err
    assert (out / "result.json.corrupt").exists() and read_local_result(out) is None


def test_cli_reports_bad_config_and_exits_nonzero(tmp_path):
    cfg = write_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "scaling.pipeline", str(cfg), "--out", str(tmp_path),
         "--set", "model.depth=7"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "model.depth=7 is invalid; allowed: one of [18, 34, 50, 101, 152, 200]" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "scaling.pipeline", "no-such-preset"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "tiny" in proc.stderr


def test_checkpoints_by_wall_time_written_off_the_loop_resume_to_the_same_weights(
        tiny, tmp_path, monkeypatch):
    """runtime.checkpoint_minutes (the GPU presets'): a checkpoint at the log points
    where the time is up, written by a thread. A stage that fails right after one was
    handed to the thread (the write still running) leaves it whole; the stage run
    again resumes from it to the weights of a run nobody stopped."""
    from scaling.configure import with_overrides
    from scaling.stages.stage_run import StageRun

    cfg = with_overrides(tiny, {"pretrain.epochs": 2, "data.val_size": 0,
                                "runtime.checkpoint_minutes": 1e-9, "runtime.log_every": 2})
    run_stage("pretrain", cfg, tmp_path / "clean")
    original = StageRun.after_step

    def fail_at_step_10(self, loss, lr, images):
        original(self, loss, lr, images)
        if self.step == 10:  # step 10's checkpoint is with the writer now
            raise RuntimeError("stopped")

    monkeypatch.setattr(StageRun, "after_step", fail_at_step_10)
    with pytest.raises(RuntimeError, match="stopped"):
        run_stage("pretrain", cfg, tmp_path / "stopped")
    monkeypatch.setattr(StageRun, "after_step", original)
    import threading
    for thread in threading.enumerate():  # the writer finishes its checkpoint
        if thread.name == "checkpoint-writer":
            thread.join()
    _, meta = latest_checkpoint(tmp_path / "stopped")
    assert meta["step"] == 10
    assert run_stage("pretrain", cfg, tmp_path / "stopped")["resumed_from"] == 10
    a, b = load_final_models(tmp_path / "stopped"), load_final_models(tmp_path / "clean")
    for key, value in a["encoder"].items():
        want = b["encoder"][key].float()
        assert (value.float() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max()), key
