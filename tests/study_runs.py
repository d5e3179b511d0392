"""A small real study, run as a user runs it (``studies/model_size.py`` in its own
process): the command, running it, and interrupting it. The session's reference
run of it is conftest's ``reference_study``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# MLflow 3 keeps its file store only on request; the tests need no server.
ENV = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
# Two cells (label fractions) sharing one pretraining: 10 rows, 9 distinct stage runs.
# Pretraining has 12 epochs of 14 steps, checkpointed every 4: a window of seconds to
# interrupt it in, and the same numbers after any interruption.
SPEC = {"preset": "quick", "base": str(REPO / "configs" / "tiny.yaml"),
        "axes": {"width": [0.0625], "label_fraction": [0.1, 0.5]},
        "set": {"pretrain.epochs": 12, "pretrain.batch_size": 16, "finetune.epochs": 3,
                "supervised.epochs": 2, "runtime.device": "cpu", "runtime.workers": 0,
                "runtime.checkpoint_every": 4, "runtime.log_every": 4}}
NAME = "model_size-quick"


def write_spec(folder: Path) -> Path:
    spec = folder / "study.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    return spec


def command(spec: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "studies/model_size.py", "--file", str(spec), "--storage",
            str(storage), "--no-report", *extra]


def run(cmd: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=ENV)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """``cmd`` in its own process group (so a signal reaches the whole group, as a
    terminal's Ctrl-C does). A terminal's child gets SIGINT's default action: an
    ignored SIGINT would be inherited through exec, and Python installs no
    KeyboardInterrupt handler then."""
    return subprocess.Popen(cmd, cwd=REPO, text=True, start_new_session=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kw)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen | None = None,
               timeout: float = 300, what: str = "the condition") -> None:
    """Poll ``ready()`` every 50 ms; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None:
            assert proc.poll() is None, (f"ended before {what}", proc.communicate())
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)


def gone(pids: list[int]) -> Callable[[], bool]:
    """True once none of ``pids`` runs anything: ended, a zombie, or back in Ray's
    pool of idle workers (orphaned Ray workers noticing their driver is gone). What a
    resume waits for instead of a fixed sleep."""
    import psutil

    def busy(pid: int) -> bool:
        try:
            p = psutil.Process(pid)
            return p.status() != psutil.STATUS_ZOMBIE and "ray::IDLE" not in " ".join(
                p.cmdline())
        except psutil.Error:  # ended
            return False

    def check() -> bool:
        return not any(busy(p) for p in pids)
    return check


def ray_workers() -> list[int]:
    """Pids of this machine's busy Ray worker processes (trials, Train workers,
    actors): the ones that could still write to a stage directory after their driver
    died. Idle pooled workers (ray::IDLE) run nothing, and a node's agents
    (ray::DashboardAgent, ray::RuntimeEnvAgent: a minute to notice their node is
    gone) write no stage: both are left to Ray."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if (p.pid != os.getpid() and "ray::" in cmd and "ray::IDLE" not in cmd
                and "Agent" not in cmd.split()[0]):
            out.append(p.pid)
    return out


def orphans_gone(before: set[int], timeout: float = 120) -> None:
    """Wait until the Ray workers started since ``before`` (a killed driver's) end."""
    wait_until(gone([p for p in ray_workers() if p not in before]), timeout=timeout,
               what="the killed driver's Ray workers ending")


def in_process(main: Callable[[list[str]], int], argv: list[str]
               ) -> subprocess.CompletedProcess:
    """A command line's main(argv) in this process, as a finished process: stdout and
    stderr captured, SystemExit (argparse: --help, usage errors) taken as the status."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_here(spec: Path, storage: Path, *extra: str) -> subprocess.CompletedProcess:
    """The same study command through its main(argv) in this process (no interpreter
    or torch start-up; a Ray it starts stays up for the next call: shut it down)."""
    from studies import model_size
    from studies.cli import main

    return in_process(lambda argv: main(model_size.STUDY, argv),
                      command(spec, storage, *extra)[2:])
