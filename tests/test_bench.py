"""The benchmarks compute what they claim to (no timing is asserted here)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from scaling.data.augment import ViewSpec
from scaling.model.network import build_contrastive
from scaling.train.losses import nt_xent
from scaling.train.measure import forward_flops_per_image

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_bare_loops_nt_xent_is_the_projects():
    plain = _bench("throughput").plain_nt_xent
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    for t in (0.1, 0.5):
        assert plain(torch.cat([z1, z2]), t).item() == pytest.approx(
            nt_xent(z1, z2, t).item(), rel=1e-5)


@pytest.mark.parametrize("case", ["fmnist", "rgb32", "rgb224"])
def test_the_torchvision_pipeline_makes_views_like_ours(case):
    augment = _bench("augment")
    channels, source, out, spec, _ = augment.CASES[case]
    view = augment.torchvision_view(spec, out)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (channels, source, source), dtype=torch.uint8, generator=g)
    v = view(x)
    assert v.shape == (channels, out, out) and v.dtype == torch.float32
    assert v.min() >= 0 and v.max() <= 1
    # The same recipe as ours, step by step.
    names = [type(t).__name__ for t in view.transforms]
    assert names[:4] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply",
                         "RandomGrayscale"]
    assert ("RandomApply" in names[4:]) == (spec.blur_p > 0)


@pytest.mark.slow
def test_gpu_script_runs_its_smoke_case_and_counts_training_flops():
    done = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    gpu = _bench("gpu")
    case = gpu.SMOKE["smoke"]
    line = next(ln for ln in done.stdout.splitlines() if "GFLOP per pair" in ln)
    per_pair = float(line.split()[0]) * 1e9
    net = build_contrastive(gpu.ModelConfig(case.depth, case.width, stem=case.stem),
                            gpu.HeadConfig(3, 128), 3, case.side)
    forward = forward_flops_per_image(net, 3, case.side)
    # Training a pair: two views, each forward + backward (~2x forward; the first
    # convolution needs no input gradient, so a little under 3x).
    assert 2 * 2.5 * forward < per_pair <= 2 * 3.0 * forward
    assert "image pairs/s" in done.stdout and isinstance(case.spec, ViewSpec)
    assert "smoke-jpeg eager:" in done.stdout  # the JPEG input path ran too


def test_the_folder_bench_times_both_paths_on_real_jpegs(tmp_path):
    folder = _bench("folder")
    folder.make_jpegs(tmp_path, 3)
    files = sorted((tmp_path / "train" / "c").glob("*.JPEG"))
    assert len(files) == 3 and files[0].read_bytes()[:2] == b"\xff\xd8"  # JPEG magic
    from PIL import Image

    assert Image.open(files[0]).size == (500, 375)
    r = folder.run(images=4, batch=2, repeats=1)
    for key in ("decode_img_s", "eval_img_s", "old_pairs_s", "new_pairs_s", "new_cpu_pairs_s"):
        assert r[key] > 0, key
    assert 0 < r["new_cpu_share"] <= 1


def test_the_lars_bench_times_both_updates_of_one_network():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "lars.py"), "--depth", "18", "--width", "0.0625",
         "--batch", "4", "--size", "8", "--steps", "1", "--repeats", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LARS reference" in done.stdout and "LARS foreach" in done.stdout
    assert "reference / foreach:" in done.stdout


@pytest.mark.slow
def test_the_gpu_acceptance_script_runs_every_item_on_the_cpu():
    """bench/accept.py --smoke: the same items a GPU machine runs, at tiny shapes."""
    done = subprocess.run([sys.executable, "bench/accept.py", "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for stage in ("pretrain", "finetune", "supervised", "distill"):
        assert f"PASS smoke {stage} " in done.stdout
        assert re.search(rf"smoke {stage} syncs +0 host syncs", done.stdout)
        assert f"smoke {stage} memory" in done.stdout
    assert "PASS smoke pixels " in done.stdout  # the pixel arm on the device too
    assert re.search(r"PASS smoke resume +loss at step 4: ([0-9.]+) resumed, \1 uninterrupted",
                     done.stdout), done.stdout  # on the CPU, bit for bit
    assert "PASS folder decode on device " in done.stdout
    for item in ("smoke throughput", "input path", "lars share"):
        assert item in done.stdout
    assert "0 FAIL" in done.stdout


def test_the_checkpoint_bench_times_three_runs_on_a_slow_disk(capsys):
    _bench("checkpoint").main(["--depth", "18", "--width", "0.0625", "--steps", "2",
                               "--every", "1", "--write-delay", "0.01"])
    out = capsys.readouterr().out
    for run in ("none", "in the loop", "off the loop"):
        assert re.search(rf"{run} +[0-9.]+ s a step +overhead +[-+][0-9.]+%", out), out


def test_the_throughput_floor_names_its_published_reference():
    accept = _bench("accept")
    assert accept.reference_rate("NVIDIA A100-SXM4-80GB") == (2470.0, "A100 2470 img/s")
    assert accept.reference_rate("Tesla V100-SXM2-16GB")[0] == 1200.0
    rate, which = accept.reference_rate("NVIDIA H100 80GB HBM3")
    assert rate == 2470.0 and "A100's" in which  # no H100 in that source: the A100's floor
    assert accept.reference_rate("Tesla T4") is None  # not judged
