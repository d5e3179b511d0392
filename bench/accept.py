"""GPU acceptance in one command: PASS/FAIL per item, at most about 8 minutes on one GPU.

    python3 bench/accept.py            # on a GPU machine (no Ray needed)
    python3 bench/accept.py --smoke    # seconds on a CPU: checks the script itself

Items:
  stages   every stage (pretrain, finetune, supervised, distill) of each GPU preset
           (cifar10-gpu, imagenet-gpu) for a few steps at the preset's per-GPU batch
           and lane settings (activation checkpointing where its lane has it), on
           random images of the preset's shape: it finishes, on CUDA, with a finite loss
  memory   each stage's measured peak (torch.cuda.max_memory_allocated) against the
           dry run's plan for the same step (scaling.train.footprint): PASS when it
           stays under what the plan says is needed
  syncs    host syncs in the steady-state steps (between log lines), counted with
           torch.cuda.set_sync_debug_mode("warn"): PASS at 0
  r50      pairs/s and MFU of R50 1x pretraining steps (bench/gpu.py's r50-224, eager)
  input    the input path's share of a step: in-memory augmentation vs decode on the
           GPU (runtime.decode: device; bench/gpu.py's r50-jpeg)
  lars     the optimiser step's share of an R50 step
torch.compile is off in the stage runs (its warm-up would take the budget); bench/gpu.py
times it. Thresholds are sanity floors that catch a broken path (fp32, no channels_last,
a sync per op), not targets.
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
from scaling.configure import (
    PRESETS,  # noqa: E402
    load_config,
)
from scaling.data.datasets import ImageData  # noqa: E402
from scaling.stages.registry import run as run_stage  # noqa: E402
from scaling.stages.stage_run import StageRun  # noqa: E402
from scaling.train.env import Env  # noqa: E402
from scaling.train.footprint import GiB, step_footprint  # noqa: E402

# (preset, image side, classes, GPUs a lane in its studies, activation checkpointing)
PRESETS_GPU = {"cifar10-gpu": (32, 10, 1, False), "imagenet-gpu": (224, 1000, 16, True)}
SMOKE_PRESET = {"smoke": (16, 4, 1, False)}
MFU_FLOOR = 0.15  # bf16 + channels_last R50 steps reach well above this on H100-class GPUs
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


@contextlib.contextmanager
def sync_counter(cuda: bool) -> Iterator[list[int]]:
    """Counts host syncs (CUDA's sync debug mode) in steps after the first."""
    count = [0]
    original = StageRun.after_step

    def after_step(self: StageRun, loss: torch.Tensor, lr: float, images: int) -> None:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        original(self, loss, lr, images)
        # Armed for the next step unless this one ends at a log line or checkpoint
        # (the next step's fetch then starts an epoch: its order goes up once).
        nxt = self.step + 1
        quiet = nxt % self.runtime.log_every and nxt % self.steps_per_epoch and \
            nxt < self.total_steps
        if cuda and self.step >= 1 and quiet:
            torch.cuda.set_sync_debug_mode(1)

    with warnings.catch_warnings(record=True) as seen, \
            mock.patch.object(StageRun, "after_step", after_step):
        warnings.simplefilter("always")
        try:
            yield count
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            count[0] = sum("synchronizing" in str(w.message) for w in seen)


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
                with sync_counter(cuda) as syncs:
                    result = run()
            except Exception as e:  # noqa: BLE001 - the verdict is the report
                outcomes.append(Outcome(name, False, f"{type(e).__name__}: {e}"[:300]))
                continue
            m = result["metrics"]
            ok = result["device"].startswith(device.type) and m["final_loss"] is not None
            outcomes.append(Outcome(name, ok, f"{result['step']} steps, loss "
                                    f"{m['final_loss']:.3f}, {m['images_per_s']:.0f} img/s, "
                                    f"{time.perf_counter() - started:.0f} s"))
            outcomes.append(Outcome(f"{preset} {stage} syncs", (syncs[0] == 0) if cuda else None,
                                    f"{syncs[0]} host syncs in steady-state steps"))
            batch = getattr(cfg, stage).batch_size
            plan = step_footprint(cfg, stage, batch, 3, side, classes, len(data),
                                  device="cuda")
            if cuda:
                peak = m["peak_memory_bytes"]
                outcomes.append(Outcome(
                    f"{preset} {stage} memory", peak <= plan.needed,
                    f"peak {peak / GiB:.2f} GiB, planned {plan.total / GiB:.2f} "
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
    out = [Outcome(f"{name} throughput", None if mfu is None else mfu >= MFU_FLOOR,
                   f"{plain['pairs_per_s']:.0f} pairs/s at batch {plain['batch']}, "
                   f"{plain['tflops']:.1f} TFLOP/s" + (f", MFU {100 * mfu:.1f}% of the "
                                                      f"{peak:.0f} TFLOP/s datasheet peak"
                                                      if mfu is not None else ""))]
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
    for o in run_throughput(device, args.smoke, deadline):
        print(o.line(), flush=True)
        outcomes.append(o)
    failed = [o for o in outcomes if o.ok is False]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} items not failed, "
          f"{len(failed)} FAIL, {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
