"""GPU acceptance in one command: PASS/FAIL per item, at most about 8 minutes on one GPU.

    python3 bench/accept.py            # on a GPU machine (no Ray needed)
    python3 bench/accept.py --smoke    # seconds on a CPU: checks the script itself

Items:
  stages   every stage (pretrain, finetune, supervised, distill) of each GPU preset
           (cifar10-gpu, imagenet-gpu) for a few steps at the preset's per-GPU batch
           and lane settings (activation checkpointing where its lane has it), on
           random images of the preset's shape: it finishes, on CUDA, with a finite loss
  memory   each stage's peak over its set-up and training steps
           (torch.cuda.max_memory_allocated after each step; the evaluation after the
           last step is left out, as the plan leaves it out) against the dry run's plan
           for the same step (scaling.train.footprint): PASS when it stays under what
           the plan says is needed
  syncs    host syncs in the steps after the first, through each step's tail
           (StageRun.after_step), counted with torch.cuda.set_sync_debug_mode("warn"):
           PASS at 0, but for the one read a log point allows (at that step only), an
           epoch's first step (its batch order goes up once) and a checkpoint's copies
  resume   pretraining saved at step 3, loaded by a second run, stepped: its loss at
           step 4 equals the uninterrupted run's (relative 1e-2: bf16, and cuDNN may
           pick other kernels in the new run)
  folder   pretraining on an image folder of JPEGs this script writes, decoded on the
           device (runtime.decode: device): finishes on CUDA, finite loss, no host sync
  r50      images/s and MFU of R50 1x pretraining steps (bench/gpu.py's r50-224, eager),
           against a floor from a published reference for the GPU class (REFERENCE)
  input    the input path's share of a step: in-memory augmentation vs decode on the
           GPU (runtime.decode: device; bench/gpu.py's r50-jpeg)
  lars     the optimiser step's share of an R50 step
torch.compile is off in the stage runs (its warm-up would take the budget); bench/gpu.py
times it. Thresholds are floors that catch a broken path (fp32, no channels_last, a
sync per op), not targets; each names its source in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu  # noqa: E402  (bench/gpu.py)

from scaling.config import ExperimentConfig  # noqa: E402
from scaling.configure import (  # noqa: E402
    PRESETS,
    load_config,
    with_overrides,
)
from scaling.data.datasets import ImageData  # noqa: E402
from scaling.stages.registry import run as run_stage  # noqa: E402
from scaling.stages.stage_run import StageRun  # noqa: E402
from scaling.train.env import Env  # noqa: E402
from scaling.train.footprint import GiB, step_footprint  # noqa: E402

# (preset, image side, classes, GPUs a lane in its studies, activation checkpointing)
PRESETS_GPU = {"cifar10-gpu": (32, 10, 1, False), "imagenet-gpu": (224, 1000, 16, True)}
SMOKE_PRESET = {"smoke": (16, 4, 1, False)}
# Published single-GPU training throughput of ResNet-50 v1.5 at 224 px, mixed precision,
# batch 256: NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5
# README, "Training performance" (pytorch-21.03 NGC container, DALI input). That source
# lists no H100/H200: an A100's number is their floor (a newer GPU is not slower).
REFERENCE = {"A100": 2470.0, "V100": 1200.0}
REFERENCE_SOURCE = ("NVIDIA DeepLearningExamples resnet50v1.5 (PyTorch) README, 1 GPU, "
                    "mixed precision")
NEWER = ("H100", "H200", "H800", "B100", "B200", "GH200", "L40")
# Our step does more per image than that benchmark's (two views through the projection
# head, NT-Xent over the batch, LARS, augmentation on the GPU, eager, no DALI): the
# floor is half the published rate. A broken path (fp32, no channels_last, a sync per
# op) falls several-fold below it.
FLOOR_FRACTION = 0.5
LARS_CEILING = 0.15  # of a step; the multi-tensor LARS should be a few percent


@dataclasses.dataclass
class Outcome:
    name: str
    ok: bool | None  # None: not judged (no GPU, skipped)
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "INFO"}[self.ok]
        return f"{verdict:<5}{self.name:<28} {self.detail}"


def config(preset: str, device: str, smoke: bool) -> ExperimentConfig:
    """The preset at its per-GPU batch, a few steps of each stage, cheap probes."""
    side, _, lane, ckpt = (SMOKE_PRESET["smoke"] if smoke else PRESETS_GPU[preset])
    base = load_config(PRESETS / f"{'tiny' if smoke else preset}.yaml")
    batch = {s: max(2, getattr(base, s).batch_size // lane)
             for s in ("pretrain", "finetune", "distill", "supervised")}
    return load_config(PRESETS / f"{'tiny' if smoke else preset}.yaml", {
        "data.val_size": 16, "data.val_excluded_file": None, "data.image_size": side,
        "label_fractions": [], "finetune.per_fraction": {}, "finetune.label_fraction": 0.5,
        "finetune.lr_grid": [], "supervised.lr_grid": [], "pretrain.epochs": 1,
        "finetune.epochs": 1, "finetune.min_steps": 0, "supervised.epochs": 1,
        "supervised.min_steps": 0, "distill.epochs": 1, "distill.min_steps": 0,
        "evaluate.linear_steps": 20, "runtime.device": device, "runtime.compile": False,
        "runtime.log_every": 2, "runtime.activation_checkpointing": ckpt,
        **{f"{s}.batch_size": b for s, b in batch.items()}})


def images_for(cfg: ExperimentConfig, channels: int, side: int, classes: int) -> ImageData:
    """Random images, enough for 4 steps of the largest batch plus validation."""
    n = 16 + 4 * max(cfg.pretrain.batch_size, cfg.distill.batch_size,
                     2 * cfg.finetune.batch_size, 2 * cfg.supervised.batch_size)
    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8,
                                   generator=g), torch.arange(n) % classes, classes, "accept")


@dataclasses.dataclass
class StepWatch:
    syncs: int = 0  # host syncs outside what a step may do
    reads: int = 0  # the one read a log point allows, counted apart
    peak: int = 0  # bytes allocated at most over set-up and training steps


@contextlib.contextmanager
def step_watch(cuda: bool, device: torch.device | None = None) -> Iterator[StepWatch]:
    """Counts host syncs (CUDA's sync debug mode) in the steps after the first, their
    tails included, and the peak memory over the training steps."""
    watch = StepWatch()
    original_after, original_checkpoint = StageRun.after_step, StageRun.checkpoint

    def mode(on: bool) -> None:
        if cuda:
            torch.cuda.set_sync_debug_mode(1 if on else 0)

    def after_step(self: StageRun, loss: torch.Tensor, lr: float, images: int) -> None:
        due = any(self.due())
        before = _synced(seen)
        original_after(self, loss, lr, images)
        if due:  # one read allowed here, at this step only
            read = min(_synced(seen) - before, 1)
            watch.reads += read
            allowed.append(read)
        if cuda:
            watch.peak = max(watch.peak, torch.cuda.max_memory_allocated(device))
        # The next step starts an epoch: its batch order goes up once (not watched).
        mode(self.step >= 1 and self.step % self.steps_per_epoch != 0)

    def checkpoint(self: StageRun) -> Any:
        mode(False)  # a checkpoint copies the state to the host, by design
        try:
            return original_checkpoint(self)
        finally:
            mode(self.step >= 1)

    allowed: list[int] = []
    with warnings.catch_warnings(record=True) as seen, \
            mock.patch.object(StageRun, "after_step", after_step), \
            mock.patch.object(StageRun, "checkpoint", checkpoint):
        warnings.simplefilter("always")
        try:
            yield watch
        finally:
            mode(False)
            watch.syncs = _synced(seen) - sum(allowed)


def _synced(seen: list[warnings.WarningMessage]) -> int:
    return sum("synchronizing" in str(w.message) for w in seen)


def run_stages(preset: str, device: torch.device, smoke: bool, out: Path,
               deadline: float) -> list[Outcome]:
    cfg = config(preset, device.type, smoke)
    side, classes, _, _ = SMOKE_PRESET["smoke"] if smoke else PRESETS_GPU[preset]
    data = images_for(cfg, 3, side, classes)
    env = Env(device, checkpointing=cfg.runtime.activation_checkpointing)
    cuda = device.type == "cuda"
    runs: list[tuple[str, Callable[[], Any]]] = [
        ("pretrain", lambda: run_stage("pretrain", cfg, out / "pretrain", env)),
        ("finetune", lambda: run_stage("finetune", cfg, out / "finetune", out / "pretrain", env)),
        ("supervised", lambda: run_stage("supervised", cfg, out / "supervised", env)),
        ("distill", lambda: run_stage("distill", cfg, out / "distill", out / "finetune", env)),
    ]
    outcomes = []
    with mock.patch("scaling.data.splits.load_dataset", lambda *a, **k: data):
        for stage, run in runs:
            name = f"{preset} {stage}"
            if time.perf_counter() > deadline:
                outcomes.append(Outcome(name, None, "skipped: past the deadline"))
                continue
            started = time.perf_counter()
            try:
                with step_watch(cuda, device) as watch:
                    result = run()
            except Exception as e:  # noqa: BLE001 - the verdict is the report
                outcomes.append(Outcome(name, False, f"{type(e).__name__}: {e}"[:300]))
                continue
            m = result["metrics"]
            ok = result["device"].startswith(device.type) and m["final_loss"] is not None
            outcomes.append(Outcome(name, ok, f"{result['step']} steps, loss "
                                    f"{m['final_loss']:.3f}, {m['images_per_s']:.0f} img/s, "
                                    f"{time.perf_counter() - started:.0f} s"))
            outcomes.append(Outcome(f"{preset} {stage} syncs", (watch.syncs == 0) if cuda else None,
                                    f"{watch.syncs} host syncs in steady-state steps "
                                    f"({watch.reads} allowed reads at log points)"))
            batch = getattr(cfg, stage).batch_size
            plan = step_footprint(cfg, stage, batch, 3, side, classes, len(data),
                                  device="cuda")
            if cuda:
                peak = watch.peak  # training steps only: the plan is a training step's
                outcomes.append(Outcome(
                    f"{preset} {stage} memory", peak <= plan.needed,
                    f"training peak {peak / GiB:.2f} GiB, planned {plan.total / GiB:.2f} "
                    f"(x{peak / max(plan.total, 1):.2f}), needed {plan.needed / GiB:.2f}"))
            else:
                outcomes.append(Outcome(f"{preset} {stage} memory", None,
                                        f"planned {plan.total / GiB:.3f} GiB (no GPU to "
                                        "measure)"))
        # The pixel arm: no training step, features on the device, fits in float64.
        started = time.perf_counter()
        try:
            m = run_stage("pixels", cfg, out / "pixels", env)["metrics"]
            outcomes.append(Outcome(f"{preset} pixels", 0 <= m["test_top1"] <= 1,
                                    f"test top-1 {m['test_top1']:.3f} from "
                                    f"{m['labelled_examples']} labels, "
                                    f"{time.perf_counter() - started:.0f} s"))
        except Exception as e:  # noqa: BLE001 - the verdict is the report
            outcomes.append(Outcome(f"{preset} pixels", False, f"{type(e).__name__}: {e}"[:300]))
    return outcomes


class Stop(Exception):
    """Ends a run after its checkpoint, as a kill would (the resume item)."""


def run_resume(device: torch.device, smoke: bool, out: Path) -> list[Outcome]:
    """Save at step 3, load in a second run, step: the same loss as continuing."""
    preset = "smoke" if smoke else "cifar10-gpu"
    side, classes, _, _ = SMOKE_PRESET["smoke"] if smoke else PRESETS_GPU[preset]
    cfg = with_overrides(config(preset, device.type, smoke), {
        "runtime.checkpoint_every": 3, "runtime.checkpoint_minutes": 0})
    data = images_for(cfg, 3, side, classes)
    env = Env(device, checkpointing=cfg.runtime.activation_checkpointing)
    losses: dict[str, list[float]] = {"a": [], "b": []}
    original = StageRun.after_step
    stop_at: list[int | None] = [None]

    def after_step(self: StageRun, loss: torch.Tensor, lr: float, images: int) -> None:
        losses[self.out.name].append(float(loss.detach()))  # a read a step: not timed here
        original(self, loss, lr, images)
        if self.step == stop_at[0]:
            raise Stop

    name = f"{preset} resume"
    try:
        with mock.patch("scaling.data.splits.load_dataset", lambda *a, **k: data), \
                mock.patch.object(StageRun, "after_step", after_step):
            run_stage("pretrain", cfg, out / "a", env=env)  # uninterrupted
            stop_at[0] = 3
            with contextlib.suppress(Stop):
                run_stage("pretrain", cfg, out / "b", env=env)
            stop_at[0] = None
            resumed = run_stage("pretrain", cfg, out / "b", env=env)
    except Exception as e:  # noqa: BLE001 - the verdict is the report
        return [Outcome(name, False, f"{type(e).__name__}: {e}"[:300])]
    a, b = losses["a"], losses["b"]
    if resumed["resumed_from"] != 3 or len(a) < 4 or len(b) < 4:
        return [Outcome(name, False, f"resumed from {resumed['resumed_from']}, steps "
                                     f"{len(a)} and {len(b)}")]
    gap = abs(b[3] - a[3]) / max(abs(a[3]), 1e-12)
    return [Outcome(name, gap <= 1e-2, f"loss at step 4: {b[3]:.5f} resumed, {a[3]:.5f} "
                                       f"uninterrupted (relative gap {gap:.1e})")]


def write_jpegs(root: Path, per_class: int, height: int, width: int) -> None:
    """Two classes of smooth random colour fields as JPEGs (they compress like photos),
    in an ImageNet-style tree: train/ and val/ (the test split)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((width, height),
                                                       Image.Resampling.BICUBIC)
                image.save(root / split / c / f"{c}_{i}.JPEG", quality=90)


def run_folder(device: torch.device, smoke: bool, out: Path) -> list[Outcome]:
    """Pretraining on JPEG files decoded on the device, four steps."""
    batch, side = (8, 32) if smoke else (64, 224)
    write_jpegs(out / "jpegs", (4 * batch + 8) // 2, 3 * side // 2, 2 * side)
    base = "tiny" if smoke else "imagenet-gpu"
    cfg = load_config(PRESETS / f"{base}.yaml", {
        "data.name": "imagefolder", "data.root": str(out / "jpegs"), "data.image_size": side,
        "data.val_size": 8, "data.val_excluded_file": None, "label_fractions": [],
        "pretrain.batch_size": batch, "pretrain.epochs": 1, "evaluate.knn_k": 5,
        "evaluate.linear_steps": 5, "runtime.device": device.type, "runtime.compile": False,
        "runtime.decode": "device", "runtime.loader_workers": 2, "runtime.log_every": 2})
    env = Env(device)
    cuda = device.type == "cuda"
    name = "folder decode on device"
    started = time.perf_counter()
    try:
        with step_watch(cuda, device) as watch:
            result = run_stage("pretrain", cfg, out / "folder", env=env)
    except Exception as e:  # noqa: BLE001 - the verdict is the report
        return [Outcome(name, False, f"{type(e).__name__}: {e}"[:300])]
    m = result["metrics"]
    ok = result["device"].startswith(device.type) and m["final_loss"] is not None
    return [Outcome(name, ok, f"{result['step']} steps of {batch} at {side} px from JPEGs, loss "
                              f"{m['final_loss']:.3f}, {time.perf_counter() - started:.0f} s"),
            Outcome(f"{name} syncs", (watch.syncs == 0) if cuda else None,
                    f"{watch.syncs} host syncs in steady-state steps")]


def reference_rate(gpu_name: str) -> tuple[float, str] | None:
    """The published images/s for this GPU class (REFERENCE), and which it is."""
    for key, rate in REFERENCE.items():
        if key in gpu_name:
            return rate, f"{key} {rate:.0f} img/s"
    if any(key in gpu_name for key in NEWER):
        return REFERENCE["A100"], f"A100's {REFERENCE['A100']:.0f} img/s (none for this GPU)"
    return None


def run_throughput(device: torch.device, smoke: bool, deadline: float) -> list[Outcome]:
    cases = gpu.SMOKE if smoke else {k: gpu.CASES[k] for k in ("r50-224", "r50-jpeg")}
    steps, warmup = (2, 1) if smoke else (10, 3)
    results = {}
    for key, case in cases.items():
        if time.perf_counter() > deadline:
            return [Outcome(key, None, "skipped: past the deadline")]
        results[key] = gpu.run_case(case, device, False, steps, warmup)
    plain, jpeg_case = list(results.values())
    peak = gpu.peak_tflops(device)
    mfu = plain["tflops"] / peak if peak else None
    name = "r50" if not smoke else "smoke"
    rate = 2 * plain["pairs_per_s"]  # images through the network: two views a pair
    ref = reference_rate(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    floor = None if ref is None else FLOOR_FRACTION * ref[0]
    out = [Outcome(f"{name} throughput", None if floor is None else rate >= floor,
                   f"{rate:.0f} img/s ({plain['pairs_per_s']:.0f} pairs/s) at batch "
                   f"{plain['batch']}, {plain['tflops']:.1f} TFLOP/s"
                   + (f", MFU {100 * mfu:.1f}% of the {peak:.0f} TFLOP/s datasheet peak"
                      if mfu is not None else "")
                   + (f"; floor {floor:.0f} = {FLOOR_FRACTION:g} x {ref[1]} ({REFERENCE_SOURCE})"
                      if ref is not None and floor is not None else "; no reference: not judged"))]
    out.append(Outcome("input path", None,
                       f"in-memory augmentation {100 * plain['augment_share']:.1f}% of a step; "
                       f"decode on the device + crops + colour "
                       f"{100 * jpeg_case['augment_share']:.1f}% "
                       f"({jpeg_case['pairs_per_s']:.0f} pairs/s)"))
    share = plain["optim_share"]
    out.append(Outcome("lars share", share <= LARS_CEILING if device.type == "cuda" else None,
                       f"optimiser step {100 * share:.1f}% of a step"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or --smoke on a CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", 0)
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device)}", flush=True)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in (["smoke"] if args.smoke else list(PRESETS_GPU)):
            for o in run_stages(preset, device, args.smoke, Path(tmp) / preset, deadline):
                print(o.line(), flush=True)
                outcomes.append(o)
        for item, run in (("resume", run_resume), ("folder", run_folder)):
            if time.perf_counter() > deadline:
                found = [Outcome(item, None, "skipped: past the deadline")]
            else:
                found = run(device, args.smoke, Path(tmp) / item)
            for o in found:
                print(o.line(), flush=True)
                outcomes.append(o)
    for o in run_throughput(device, args.smoke, deadline):
        print(o.line(), flush=True)
        outcomes.append(o)
    failed = [o for o in outcomes if o.ok is False]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} items not failed, "
          f"{len(failed)} FAIL, {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
