"""Stage outputs on object storage: a real S3 API (moto's server on loopback),
reached only through pyarrow, with every node-local file in a scratch mirror
that the tests delete to play a fresh node."""

import shutil

import pytest
import torch

from scaling import stage_result, storage
from scaling.configure import with_overrides
from scaling.stage_result import load_final_models

moto_server = pytest.importorskip("moto.server")
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint with a bucket; the environment Ray's workers inherit points at it."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    patch.setenv("AWS_ACCESS_KEY_ID", "test")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    patch.setenv("AWS_REGION", "us-east-1")
    patch.setenv("SCALING_SCRATCH", str(tmp_path_factory.mktemp("scratch")))
    boto3.client("s3").create_bucket(Bucket="bucket")
    yield "s3://bucket"
    patch.undo()
    server.stop()


def test_locations_join_and_name_the_same_way_for_paths_and_uris(tmp_path):
    uri = "s3://bucket/runs/tiny"
    assert storage.join(uri, "pretrain-abc") == "s3://bucket/runs/tiny/pretrain-abc"
    assert storage.parent(storage.join(uri, "x")) == uri and storage.name(uri) == "tiny"
    assert storage.join(tmp_path, "x") == tmp_path / "x"
    assert storage.parse(str(tmp_path)) == tmp_path and storage.parse(uri) == uri
    assert storage.local_dir(tmp_path) == tmp_path
    assert storage.local_dir(uri).name == "tiny" and storage.local_dir(uri) != storage.local_dir(
        "s3://other/runs/tiny")


@pytest.mark.slow
def test_publish_then_fetch_round_trips_a_finished_stage(s3, tiny, tmp_path):
    from scaling.runtime.local import run_local

    cfg = with_overrides(tiny, {"pretrain.epochs": 1})
    where = f"{s3}/roundtrip/pretrain"
    assert stage_result.read_result(where) is None
    result = run_local("pretrain", cfg, where, None)
    assert stage_result.read_result(where) == result  # published
    shutil.rmtree(storage.local_dir(where))  # another node: nothing local
    local = stage_result.fetch(where)
    assert local == storage.local_dir(where) and stage_result.read_result(local) == result
    models = load_final_models(local)  # sha256 of the fetched model matches result.json
    assert "encoder" in models


@pytest.mark.slow
def test_pipeline_on_ray_with_s3_storage_and_a_fresh_node_resume(s3, tiny):
    """The whole chain on Ray Train with results on S3; then a 'fresh node' (no
    scratch mirror, pretraining's result gone from S3) restores pretraining from
    the checkpoint Ray Train keeps in S3 instead of recomputing it."""
    from scaling.configure import fraction_configs
    from scaling.runtime.local import run_pipeline
    from scaling.runtime.ray_train import run_stage
    from scaling.stages.registry import stage_dir

    cfg = with_overrides(tiny, {"label_fractions": [0.5]})
    root = f"{s3}/runs/tiny"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Pretraining on Ray Train (its checkpoints on S3), the rest of the chain in
        # this process (workers=0: same stage keys, no worker start-up each).
        run_stage("pretrain", cfg, stage_dir(root, cfg, "pretrain"))
        results = run_pipeline(with_overrides(cfg, {"runtime.workers": 0}), root, run_stage)
        assert [r["stage"] for r in results] == ["pretrain", "finetune", "distill", "supervised",
                                                 "pixels"]
        half = fraction_configs(cfg)[0]
        for r, stage in zip(results, ["pretrain", "finetune", "distill", "supervised",
                                      "pixels"], strict=True):
            assert stage_result.read_result(stage_dir(root, half, stage)) == r
        pre = stage_dir(root, cfg, "pretrain")
        before = load_final_models(stage_result.fetch(pre))
        shutil.rmtree(storage.scratch_root())
        storage.delete(pre, "result.json")
        again = run_stage("pretrain", cfg, pre)
        print("fresh node resumed pretraining at step", again["resumed_from"], "of", again["step"])
        assert again["resumed_from"] == again["step"] == results[0]["step"]
        after = load_final_models(stage_result.fetch(pre))
        for k, v in before["encoder"].items():
            assert torch.equal(v, after["encoder"][k]), k
        # The rest of the chain is found on S3 and returned, not recomputed.
        assert run_pipeline(cfg, root, run_stage)[1:] == results[1:]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_study_resumes_from_s3_after_the_head_node_is_replaced(s3, tmp_path):
    """The sweep's driver dies with its node (SIGKILL; its scratch mirror deleted);
    `--resume` on a new 'head' with the same --storage URI finds the Tune state and
    every finished stage on S3 and completes the sweep. A mistyped URI is refused."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import boto3
    import yaml

    repo = Path(__file__).resolve().parent.parent
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({
        "preset": "quick", "base": "tiny", "axes": {"width": [0.0625], "label_fraction": [0.5]},
        "set": {"pretrain.epochs": 1, "finetune.epochs": 8, "runtime.device": "cpu",
                "runtime.workers": 0}}))
    cmd = [sys.executable, "studies/model_size.py", "--file", str(spec), "--no-report",
           "--storage", f"{s3}/studies"]

    def env(node: str) -> dict[str, str]:
        return {**os.environ, "SCALING_SCRATCH": str(tmp_path / node)}

    refused = subprocess.run([*cmd[:-1], f"{s3}/stdies", "--resume"], cwd=repo, env=env("a"),
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    bucket = boto3.resource("s3").Bucket("bucket")

    def pretrained() -> bool:
        return any(o.key.endswith("result.json") and "/pretrain-" in o.key
                   for o in bucket.objects.filter(Prefix="studies/stages/"))

    from study_runs import orphans_gone, ray_workers

    ray_before = set(ray_workers())
    first = subprocess.Popen(cmd, cwd=repo, env=env("a"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not pretrained():
        assert first.poll() is None and time.monotonic() < deadline, "never pretrained"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    orphans_gone(ray_before)  # the orphaned trial notices its driver is gone, and ends
    shutil.rmtree(tmp_path / "a")  # the old head's disk is gone with it
    again = subprocess.run([*cmd, "--resume"], cwd=repo, env=env("b"), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming the sweep in {s3}/studies/model_size-quick/_tune" in again.stdout
    table = storage.read_text(f"{s3}/studies/model_size-quick", "results.csv")
    assert table is not None
    import io

    import pandas as pd

    df = pd.read_csv(io.StringIO(table))
    assert sorted(df["stage"]) == ["distill", "finetune", "pixels", "pretrain", "supervised"]
    assert df.set_index("stage").loc["pretrain", "status"] == "reused"  # not recomputed


@pytest.mark.slow
def test_a_stages_checkpoints_come_back_from_an_earlier_invocations_lane_run(s3, tiny):
    """With S3 storage a stage killed with its sweep's driver has its checkpoints only
    in Ray's copy, under the killed invocation's lane run: a fresh node's empty stage
    directory gets the latest one of each of its runs (an LR grid's too) back."""
    import boto3

    from scaling.runtime.local import StageJob
    from scaling.runtime.ray_train import restore_from_runs

    bucket = boto3.resource("s3").Bucket("bucket")
    train = "lanes-study/_train"
    for run, name in [("lane-0-a-1", "pretrain-k1@checkpoints@step-000000004"),
                      ("lane-1-a-1", "pretrain-k1@checkpoints@step-000000008"),
                      ("lane-0-a-1", "finetune-k2@lr-0.1@checkpoints@step-000000002"),
                      ("lane-0-a-1", "pretrain-k10@checkpoints@step-000000012")]:
        for file in ("state.pt", "meta.json"):
            bucket.put_object(Key=f"{train}/{run}/{name}/{file}", Body=f"{name}/{file}".encode())
    pre = StageJob("pretrain", tiny, f"{s3}/lanes-study/stages/pretrain-k1")
    ft = StageJob("finetune", tiny, f"{s3}/lanes-study/stages/finetune-k2")
    restore_from_runs([pre, ft], f"{s3}/{train}")
    got = storage.local_dir(pre.out)
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == ["step-000000008"]
    assert (got / "checkpoints/step-000000008/state.pt").read_text() == (
        "pretrain-k1@checkpoints@step-000000008/state.pt")
    grid = storage.local_dir(ft.out) / "lr-0.1/checkpoints/step-000000002"
    assert (grid / "meta.json").exists() and (grid / "state.pt").exists()
    # A stage directory with checkpoints of its own is left alone.
    restore_from_runs([pre], f"{s3}/{train}")
    (got / "checkpoints/step-000000008").rename(got / "checkpoints/step-000000009")
    restore_from_runs([pre], f"{s3}/{train}")
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == ["step-000000009"]

    # Each run is listed once per process, but a run started since is seen, and a
    # run of the live invocation is listed afresh (it may have grown).
    def put(run: str, name: str) -> None:
        bucket.put_object(Key=f"{train}/{run}/{name}/state.pt", Body=b"s")

    late = StageJob("pretrain", tiny, f"{s3}/lanes-study/stages/pretrain-k3")
    put("lane-0-b-1", "pretrain-k3@checkpoints@step-000000004")
    restore_from_runs([late], f"{s3}/{train}", live="-b-")
    put("lane-0-b-1", "pretrain-k3@checkpoints@step-000000006")
    shutil.rmtree(storage.local_dir(late.out))
    restore_from_runs([late], f"{s3}/{train}", live="-b-")
    assert [p.name for p in (storage.local_dir(late.out) / "checkpoints").iterdir()] == [
        "step-000000006"]
