"""cluster/slurm.sbatch's start-up, run by bash with Slurm's and Ray's commands
replaced by recorders on PATH (no Slurm here): which node starts what, in which
order, and that a cluster that never fills up stops with a message."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKES = {
    "scontrol": 'printf "gpu-a\\ngpu-b\\ngpu-c\\n"',
    # srun -w NODE CMD...: log, then run CMD "on" NODE (here).
    "srun": '''node=""; while [ $# -gt 0 ]; do case "$1" in -w) node=$2; shift 2;;
  --*) shift;; *) break;; esac; done
echo "srun@$node $*" >> "$LOG"
if [ "$1" = hostname ]; then echo "10.1.0.${node: -1} 172.17.0.1"; exit 0; fi
exec "$@"''',
    "ray": '''echo "ray $*" >> "$LOG"
if [ "$1" = status ]; then n=$(grep -c "^ray start" "$LOG"); n=$((n < JOINS ? n : JOINS))
  for i in $(seq "$n"); do echo " 1 node_$i"; done; fi''',
    "python": 'echo "python $*" >> "$LOG"',
}


def _run(tmp_path: Path, joins: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    for name, body in FAKES.items():
        f = env_dir / "bin" / name
        f.write_text(f"#!/bin/bash\n{body}\n")
        f.chmod(0o755)
    (env_dir / "bin" / "activate").write_text(f'export PATH="{env_dir / "bin"}:$PATH"\n')
    log = tmp_path / "calls.log"
    env = {**os.environ, "SCALING_ENV": str(env_dir), "LOG": str(log), "JOINS": str(joins),
           "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_GPUS_PER_NODE": "8",
           "SLURM_CPUS_ON_NODE": "96", "RAY_HEAD_WAIT": "0", "RAY_JOIN_TIMEOUT": "3"}
    proc = subprocess.run(["bash", str(REPO / "cluster" / "slurm.sbatch"),
                           "studies/model_size.py", "--preset", "cifar10-gpu"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_head_then_workers_then_the_study_on_that_cluster(tmp_path):
    proc, calls = _run(tmp_path, joins=3)
    assert proc.returncode == 0, proc.stderr
    assert "ray head on gpu-a (10.1.0.a:6379); workers: gpu-b gpu-c" in proc.stdout
    head = next(c for c in calls if c.startswith("srun@gpu-a ray start"))
    assert "--head" in head and "--num-cpus=0" in head and "--num-gpus=0" in head
    assert '"TRAIN_DRIVER": 32' in head and "--node-ip-address=10.1.0.a" in head
    workers = [c for c in calls if c.startswith(("srun@gpu-b ray start", "srun@gpu-c ray start"))]
    assert len(workers) == 2
    for w in workers:
        assert "--address=10.1.0.a:6379" in w and '"GPU_1X": 8' in w and "--num-gpus=8" in w
    study = calls[-1]
    assert study == ("python studies/model_size.py --preset cifar10-gpu "
                     "--address 10.1.0.a:6379")
    assert calls.index(head) < calls.index(study)


@pytest.mark.slow
def test_a_cluster_that_does_not_fill_up_stops_before_the_study(tmp_path):
    proc, calls = _run(tmp_path, joins=2)  # one worker never joins
    assert proc.returncode == 1
    assert "error: 2 of 3 Ray nodes joined in 3 s" in proc.stderr
    assert not any(c.startswith("python") for c in calls)
