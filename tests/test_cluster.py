"""cluster/*.yaml against Ray's own checks, offline; and the cluster path for real:
`ray up` / `ray submit` / `ray down` over SSH on 127.0.0.1 with cluster/local.yaml,
and a two-node cluster (`ray start` twice) that loses a node mid-sweep."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from scaling.config import ConfigError
from scaling.configure import load_config
from scaling.study import cluster
from scaling.study.sweep import capacity
from studies.cli import StudyDef

REPO = Path(__file__).resolve().parent.parent
# Ray cluster-launcher configs (cluster/kuberay.yaml is a Kubernetes manifest:
# tests/test_kuberay.py).
CONFIGS = sorted(p for p in (REPO / "cluster").glob("*.yaml") if p.name != "kuberay.yaml")
VENV_BIN = Path(sys.executable).parent


def _raw(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


# --- offline validation ---------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_cluster_yaml_passes_rays_checks(path):
    config = cluster.validate(yaml.safe_load(path.read_text()), path.name)
    assert config["head_node_type"] in config["available_node_types"]
    # The same pins as pyproject: nodes install the project itself, never ray or torch alone.
    assert any("pip install" in c and "simclrv2-scaling" in c for c in config["setup_commands"])
    assert "RAY_AUTH_MODE=token" in " ".join(config["setup_commands"])


def test_gpu_yaml_can_grow_to_every_gpu_preset():
    """The cluster's autoscaling limit, not the head node alone, sizes the sweep: each
    GPU preset's trials fit in what gpu.yaml can grow to."""
    most = cluster.max_resources(cluster.validate(_raw("gpu.yaml")))
    assert most is not None and most["GPU"] >= 8 and most[cluster.DRIVER_RESOURCE] >= 1
    for script in ("model_size", "head_depth", "distillation"):
        defn: StudyDef = __import__(f"studies.{script}", fromlist=["STUDY"]).STUDY
        for name, preset in defn.presets.items():
            if name.endswith("-gpu"):
                from scaling.configure import resolve

                cfg = load_config(resolve(preset.base), preset.set)
                assert capacity(cfg, most).concurrent >= 1
    with pytest.raises(ConfigError, match="runtime.workers"):  # the head alone cannot
        capacity(load_config(resolve("imagenet-gpu"), {"runtime.workers": 8,
                                                        "runtime.gpus_per_worker": 1}),
                 {"CPU": 0, "TRAIN_DRIVER": 32})


def test_max_resources_closed_form():
    config = {"head_node_type": "h", "max_workers": 5, "available_node_types": {
        "h": {"resources": {"CPU": 2, "TRAIN_DRIVER": 4}},
        "small": {"max_workers": 10, "resources": {"CPU": 8, "GPU": 1}},
        "big": {"max_workers": 2, "resources": {"CPU": 96, "GPU": 8}}}}
    # Largest nodes first within the global 5: 2 big + 3 small.
    assert cluster.max_resources(config) == {"CPU": 2 + 2 * 96 + 3 * 8, "GPU": 2 * 8 + 3,
                                             "TRAIN_DRIVER": 4}
    config["available_node_types"]["small"]["resources"] = {}
    assert cluster.max_resources(config) is None  # detected at run time: unknown now


def test_autoscaling_limit_reads_the_bootstrap_config(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "BOOTSTRAP", tmp_path / "ray_bootstrap_config.yaml")
    assert cluster.autoscaling_limit() is None
    prepared = cluster.validate(_raw("gpu.yaml"))
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(prepared))
    assert cluster.autoscaling_limit() == cluster.max_resources(prepared)


@pytest.mark.parametrize("break_it, where", [
    (lambda c: c.update(max_worker=3), "max_worker"),  # a typo of max_workers
    (lambda c: c["available_node_types"]["gpu-1x"].update(resources={"CPU": 8, "GPU": 0.5}),
     "available_node_types.gpu-1x.resources.GPU"),
    (lambda c: c["available_node_types"]["gpu-8x"].pop("node_config"), "node_config"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    (lambda c: c["available_node_types"]["head"].update(resources={"CPU": 0}), "TRAIN_DRIVER"),
    (lambda c: c.update(setup_commands=["echo hi"]), "setup_commands"),
])
def test_broken_yaml_is_caught_with_a_clear_message(break_it, where):
    raw = _raw("gpu.yaml")
    break_it(raw)
    with pytest.raises(ConfigError) as e:
        cluster.validate(raw, "gpu.yaml")
    assert where in str(e.value) and "gpu.yaml" in str(e.value)


def test_cli_names_the_file_and_key_and_exits_2(tmp_path):
    bad = _raw("local.yaml")
    bad["provider"]["worker_ips"] = "10.0.0.2"  # a string, not a list
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    run = subprocess.run([sys.executable, "-m", "scaling.study.cluster",
                          str(tmp_path / "bad.yaml")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    assert "bad.yaml" in run.stderr and "provider.worker_ips" in run.stderr


def test_missing_local_files_are_named(tmp_path):
    raw = _raw("local.yaml")
    with pytest.raises(ConfigError, match="run ray up from the repository root"):
        cluster.validate(raw, "local.yaml", base=tmp_path)  # no ./scaling there
    raw["file_mounts"] = {"~/.ray/auth_token": str(tmp_path / "no-token")}
    with pytest.raises(ConfigError, match="ray get-auth-token --generate"):
        cluster.validate(raw, "local.yaml", base=REPO)


def test_the_command_line_refuses_placeholders_relative_paths_and_missing_files(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # file_mounts resolve from the repository root, as for ray up
    # The token file_mounts sends (~/.ray/auth_token), in a home of the test's own: the
    # machine's home may have none (a fresh CI machine before any Ray test made one).
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    _token(tmp_path / "home" / ".ray")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cluster.main(["cluster/gpu.yaml"]) == 2  # as shipped: the bucket is a placeholder
    assert "setup_commands.3 still holds the placeholder 's3://EDIT-your-bucket/studies'" \
        in capsys.readouterr().err.replace("SCALING_STORAGE=", "")
    text = (REPO / "cluster" / "gpu.yaml").read_text()
    edited = tmp_path / "gpu.yaml"
    edited.write_text(text.replace("EDIT-your-bucket", "lab-bucket"))
    assert cluster.main([str(edited)]) == 0, capsys.readouterr().err
    assert "ok (aws" in capsys.readouterr().out
    relative = tmp_path / "relative.yaml"
    relative.write_text(text.replace("s3://EDIT-your-bucket/studies", "runs/studies"))
    assert cluster.main([str(relative)]) == 2
    assert "SCALING_STORAGE=runs/studies, a relative path" in capsys.readouterr().err
    raw = _raw("local.yaml")
    raw["setup_commands"].append("echo --set data.root=data/cifar10")
    assert any("data.root=data/cifar10, a relative path" in p
               for p in cluster.unfinished(raw, "local.yaml"))
    assert cluster.unfinished(_raw("local.yaml"), "local.yaml") == []
    assert cluster.main([str(tmp_path / "nonexist.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'nonexist.yaml'}: no such file")
    assert "Errno" not in err[0]


# --- a real two-node cluster on loopback ----------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_env(tmp: Path) -> dict[str, str]:
    """Token auth set the same way on every process of the cluster (and the driver)."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(_token(tmp)),
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block` in its own process group: killing the group kills the node."""
    return subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", *args], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def _wait(ready, what: str, timeout: float = 300, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for p in procs:
            assert p.poll() is None, f"{p.args[:3]} exited with {p.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _two_node_study(tmp: Path, name: str, seeds: list[int], epochs: int = 8) -> list[str]:
    spec = tmp / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({
        "preset": "quick", "base": "tiny", "seeds": seeds,
        "axes": {"width": [0.0625], "label_fraction": [0.1]},
        # The later stages as short as they go: the test is about the lost node.
        "set": {"pretrain.epochs": epochs, "pretrain.batch_size": 16, "finetune.epochs": 1,
                "supervised.epochs": 1, "distill.epochs": 1, "finetune.min_steps": 10,
                "supervised.min_steps": 10, "supervised.lr_grid": [0.4], "runtime.device": "cpu",
                "runtime.workers": 0, "runtime.checkpoint_every": 2, "runtime.log_every": 2}}))
    return [sys.executable, "studies/model_size.py", "--file", str(spec), "--no-report"]


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_and_survives_losing_a_node(tmp_path):
    """Head and worker node (1 CPU each, so two trials can only run one per node):
    the sweep loses the worker node while both trials pretrain, and still finishes
    every cell, the lost trial on the head from its last checkpoint."""
    # The GCS finds a dead node after 3 missed 1-second health checks, not Ray's default
    # 5 missed 3-second ones: the lost trial is rescheduled 12 s sooner.
    env = {**_ray_env(tmp_path), "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    port = _free_port()
    node = ["--num-cpus", "1", "--resources", json.dumps({"TRAIN_DRIVER": 2}),
            "--disable-usage-stats"]
    head = _start_node(["--head", f"--port={port}", "--include-dashboard", "false", *node],
                       env, tmp_path / "head.log")
    worker = None
    try:
        address = f"127.0.0.1:{port}"
        _wait(lambda: (tmp_path / "head.log").read_text().count("Ray runtime started") > 0,
              "the head node", 120, [head])
        worker = _start_node([f"--address={address}", *node], env, tmp_path / "worker.log")
        _wait(lambda: "Ray runtime started" in (tmp_path / "worker.log").read_text(),
              "the worker node", 120, [worker])
        storage = tmp_path / "runs"  # the same machine: a path both nodes share

        # Both trials pretraining at once proves they run one per node (1 CPU each).
        cmd = [*_two_node_study(tmp_path, "kill", [2, 3], epochs=4), "--storage", str(storage),
               "--address", address, "--name", "lose-a-node"]
        sweep = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=(tmp_path / "sweep.log").open("w"),
                                 stderr=subprocess.STDOUT)
        def both_pretraining() -> bool:
            running = [d for d in (storage / "stages").glob("pretrain-*")
                       if not (d / "result.json").exists() and any(d.glob("checkpoints/step-*"))]
            return len(running) == 2

        _wait(both_pretraining, "both trials' pretraining checkpoints", 300, [sweep])
        _kill(worker)
        worker = None
        assert sweep.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
        table = pd.read_csv(storage / "lose-a-node" / "results.csv")
        assert set(table["seed"]) == {2, 3}
        # 2 cells x 5 stages; the two seeds share one labelled subset, so one pixel run.
        assert len(table) == 10 and (table["status"] == "executed").sum() == 9
        assert table.loc[table["stage"] != "pretrain", "top1"].notna().all()
        # The trial on the dead node ran again on the head, from its last checkpoint.
        assert "pretrain: resumed from step" in (tmp_path / "sweep.log").read_text()
    finally:
        # SIGKILL to the nodes' process groups: a SIGTERM'd head took 34 s to stop, and
        # nothing of this throw-away cluster needs a clean shutdown.
        if worker is not None:
            _kill(worker)
        _kill(head)
        _forget_address(port)


def _forget_address(port: int) -> None:
    """A killed head leaves its address in Ray's address file; `ray.init()` would then
    try to join the dead cluster. `ray stop` clears it the same way."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.exists() and path.read_text().strip().endswith(f":{port}"):
        path.unlink()


# --- ray up / ray submit / ray down over SSH on 127.0.0.1 ----------------------------

CI_USER = "scaling-ci"
PACKAGES = "openssh-server rsync netcat-openbsd"


def _sh(cmd: list[str] | str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True,
                          shell=isinstance(cmd, str), **kw)


def _have_ssh_tools() -> bool:
    path = f"{os.environ['PATH']}:/usr/sbin"
    return all(shutil.which(tool, path=path) for tool in ("sshd", "rsync", "nc"))


@pytest.fixture
def ssh_login(tmp_path):
    """A throw-away login on 127.0.0.1, as a cloud node would offer: a user whose home
    is a fresh folder, a key, and an sshd of our own on a free port."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test adds a login user and runs its own sshd")
    if not _have_ssh_tools():
        got = subprocess.run(f"apt-get install -y -q {PACKAGES} || (apt-get update -q && "
                             f"apt-get install -y -q {PACKAGES})", shell=True,
                             capture_output=True, text=True)
        if got.returncode or not _have_ssh_tools():
            pytest.skip(f"sshd could not be installed here: {got.stderr[-300:]}")
    # Short paths: Ray's Unix sockets live under RAY_TMPDIR (a 107-byte limit).
    home = Path(tempfile.mkdtemp(prefix="sci-", dir="/tmp"))
    home.chmod(0o755)
    subprocess.run(["pkill", "-u", CI_USER], capture_output=True)
    subprocess.run(["userdel", "-f", CI_USER], capture_output=True)  # left by a killed run
    _sh(["useradd", "-M", "-d", str(home), "-s", "/bin/bash", "-p", "*", CI_USER])
    _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")])
    _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host")])
    (home / ".ssh").mkdir()
    shutil.copy(tmp_path / "id.pub", home / ".ssh" / "authorized_keys")
    # This machine's /tmp/ray belongs to root's Ray: the node gets its own, as a real
    # machine would (a test-environment setting, not part of cluster/local.yaml).
    (home / ".bashrc").write_text(f"export RAY_TMPDIR={home}/t\n")
    (home / "t").mkdir()
    _offline_python(home)
    _sh(["chown", "-R", f"{CI_USER}:{CI_USER}", str(home)])
    port = _free_port()
    (tmp_path / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host'}\n"
        f"PidFile {tmp_path / 'sshd.pid'}\nAuthorizedKeysFile .ssh/authorized_keys\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nAllowUsers {CI_USER}\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = subprocess.Popen([shutil.which("sshd", path="/usr/sbin:/usr/bin"), "-D", "-e", "-f",
                             str(tmp_path / "sshd_config")],
                            stdout=(tmp_path / "sshd.log").open("w"), stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _listening(port), "sshd", 30, [sshd])
        yield {"home": home, "key": tmp_path / "id", "port": port}
    finally:
        sshd.terminate()
        sshd.wait(timeout=30)
        subprocess.run(["pkill", "-KILL", "-u", CI_USER], capture_output=True)
        time.sleep(1)
        subprocess.run(["userdel", "-f", CI_USER], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _offline_python(home: Path) -> None:
    """The node's Python without downloads: Debian's python3 plus this venv's packages
    (hard links: the user cannot read root's venv, and a copy is 6 GB), standing in for
    the `uv` lines of cluster/local.yaml, which need the internet."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    _sh(["cp", "-al", str(site / "site-packages"), str(home / "packages")])
    for stale in (home / "packages").glob("*simclrv2_scaling*"):  # the root checkout's install
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    _sh(["/usr/bin/python3", "-m", "venv", "--without-pip", str(home / "scaling-env")])
    env_site = next((home / "scaling-env" / "lib").glob("python3*/site-packages"))
    (env_site / "packages.pth").write_text(f"{home / 'packages'}\n")
    ray = home / "scaling-env" / "bin" / "ray"  # what pip writes for ray's entry point
    ray.write_text(f"#!{home}/scaling-env/bin/python\nimport sys\n"
                   "from ray.scripts.scripts import main\nsys.exit(main())\n")
    ray.chmod(0o755)


def _loopback_config(login: dict, tmp_path: Path) -> Path:
    """cluster/local.yaml pointed at 127.0.0.1. Changed: the machine list, the login,
    the token file, the storage path, and the `uv` install lines (no internet in CI:
    the same editable pip install of the mounted project, from local packages)."""
    raw = _raw("local.yaml")
    raw["cluster_name"] = f"simclrv2-ci-{os.getpid()}"
    raw["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    raw["auth"] = {"ssh_user": CI_USER, "ssh_private_key": str(login["key"]),
                   "ssh_proxy_command": f"nc 127.0.0.1 {login['port']}"}
    raw["file_mounts"]["~/.ray/auth_token"] = str(_token(tmp_path))
    install = ("~/scaling-env/bin/python -m pip install -q --no-deps --no-build-isolation "
               "--no-index -e ~/simclrv2-scaling")
    setup = [c for c in raw["setup_commands"] if "uv" not in c]
    setup = [c.replace("/mnt/shared/scaling-studies", f"{login['home']}/studies") for c in setup]
    assert len(setup) == len(raw["setup_commands"]) - 3 and any("studies" in c for c in setup)
    raw["setup_commands"] = [install, *setup]
    path = tmp_path / "loopback.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _token(tmp: Path) -> Path:
    """A cluster token, as `ray get-auth-token --generate` makes one."""
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )

    token = tmp / "auth_token"
    if not token.exists():
        token.write_text(generate_new_authentication_token())
    return token


@pytest.mark.slow
def test_ray_up_submit_down_on_loopback(ssh_login, tmp_path):
    """The user's path, end to end: `ray up cluster/local.yaml`, `ray submit` a study
    to it, the table in the study storage, `ray down`."""
    config = _loopback_config(ssh_login, tmp_path)
    home = ssh_login["home"]
    spec = home / "smoke.yaml"  # a one-cell study on synthetic data, Train workers on
    spec.write_text(yaml.safe_dump({
        "preset": "quick", "base": "tiny", "axes": {"width": [0.0625], "label_fraction": [0.1]},
        "set": {"pretrain.epochs": 1, "finetune.epochs": 1, "supervised.epochs": 1,
                "runtime.device": "cpu", "runtime.workers": 1}}))
    spec.chmod(0o644)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    ray = str(VENV_BIN / "ray")
    log = (tmp_path / "launcher.log").open("w")

    def launcher(*args: str, timeout: float = 600) -> None:
        log.write(f"$ ray {' '.join(args)}\n")
        log.flush()
        done = subprocess.run([ray, *args], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
        assert done.returncode == 0, f"ray {args[0]}:\n" + (tmp_path / "launcher.log"
                                                             ).read_text()[-6000:]

    try:
        launcher("up", "-y", "--no-config-cache", str(config))
        assert (home / "ray_bootstrap_config.yaml").exists()
        launcher("submit", str(config), "studies/model_size.py", "--", "--file", str(spec))
        table = pd.read_csv(home / "studies" / "model_size-quick" / "results.csv")
        assert sorted(table["stage"]) == ["distill", "finetune", "pixels", "pretrain",
                                          "supervised"]
        assert (table["status"] == "executed").all() and table["node"].notna().all()
        trained = table[table["stage"] != "pretrain"]
        assert trained["top1"].notna().all() and table["knn_top1"].notna().any()
        assert table["git_commit"].str.match(r"^[0-9a-f]{40}").all()  # .git was mounted
        assert table["world_size"].eq(1).all()  # each stage ran on Ray Train
        report = home / "studies" / "model_size-quick" / "report"
        assert "R18 1/16x" in (report / "report.html").read_text()
        assert (report / "top1_vs_params.png").exists() and (report / "results_tidy.csv").exists()
    finally:
        launcher("down", "-y", str(config))
        log.close()
    running = subprocess.run(["pgrep", "-u", CI_USER, "-f", "raylet"], capture_output=True)
    assert running.returncode == 1, "ray down left Ray running"
