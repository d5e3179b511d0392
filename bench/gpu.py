"""SimCLR pretraining steps on one GPU, without Ray: the project's ResNet, head,
batched augmentation, NT-Xent and LARS, in bf16 with channels_last.

    python3 bench/gpu.py                 # on a lent GPU machine, about 3-4 minutes
    python3 bench/gpu.py --smoke         # seconds on a CPU: checks the script runs

Cases (images live on the GPU as uint8; augmentation runs there):
  r50-224   ResNet-50 1x, ImageNet stem, 256x256 sources -> two 224 px views,
            the ImageNet recipe (colour strength 1.0, blur p 0.5)
  r18-32    ResNet-18 1x, small stem, 32x32 sources (CIFAR's shape), strength 0.5
  r50-jpeg  r50-224 with the whole input pipeline on the GPU (runtime.decode: device):
            each step decodes its batch from 500x375 JPEG bytes (quality 90) with
            nvJPEG and cuts two full-image crops per image with roi_align, then
            flip, colour and blur; "augmentation" is then decode + crops + colour
each eager and with torch.compile (the stage's ``runtime.compile``).
Prints image pairs/s, the GPU time in augmentation / forward+loss+backward /
optimiser step (CUDA events around each phase of every timed step), training
FLOPs per pair (counted by torch's FlopCounterMode on one forward+backward),
achieved TFLOP/s, and model FLOP utilisation against the card's dense bf16 peak
(datasheet) and against a measured 8192^3 bf16 matmul.
A batch that does not fit is halved and retried; a deadline skips cases left.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaling.config import HeadConfig, ModelConfig, OptimConfig
from scaling.data import jpeg  # noqa: E402
from scaling.data.augment import (
    ViewSpec,
    augment,  # noqa: E402
)
from scaling.model.network import build_contrastive  # noqa: E402
from scaling.train.losses import nt_xent  # noqa: E402
from scaling.train.optimizer import build_optimizer  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), TFLOP/s.
PEAK_BF16 = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0,
             "L4": 121.0,
             "A10G": 70.0}


@dataclass(frozen=True)
class Case:
    name: str
    depth: int
    width: float
    stem: str
    source: int  # side of the stored images
    side: int  # side of the views
    spec: ViewSpec
    batch: int  # image pairs per step
    jpeg: tuple[int, int] | None = None  # (width, height) of JPEG sources instead


CASES = {
    "r50-224": Case("r50-224", 50, 1.0, "imagenet", 256, 224,
                    ViewSpec(color_strength=1.0, blur_p=0.5), 256),
    "r18-32": Case("r18-32", 18, 1.0, "small", 32, 32, ViewSpec(color_strength=0.5), 512),
    "r50-jpeg": Case("r50-jpeg", 50, 1.0, "imagenet", 0, 224,
                     ViewSpec(color_strength=1.0, blur_p=0.5), 256, jpeg=(500, 375)),
}
SMOKE = {"smoke": Case("smoke", 18, 0.0625, "small", 20, 16, ViewSpec(blur_p=0.5), 8),
         "smoke-jpeg": Case("smoke-jpeg", 18, 0.0625, "small", 0, 16, ViewSpec(blur_p=0.5), 8,
                            jpeg=(40, 30))}


def jpeg_sources(n: int, width: int, height: int) -> list[torch.Tensor]:
    """``n`` photo-like JPEGs (smooth colour fields, quality 90) as encoded bytes."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16[key]
    return None


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


class Timer:
    """Phase times of a step: CUDA events on a GPU (no sync inside the step),
    perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def phases(self) -> list[float]:
        """Seconds between consecutive marks (call after a synchronize)."""
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in pairwise(self.marks)]
        return [b - a for a, b in pairwise(self.marks)]


def run_case(case: Case, device: torch.device, compile: bool, steps: int, warmup: int
             ) -> dict[str, Any]:
    torch.manual_seed(0)
    model_cfg = ModelConfig(depth=case.depth, width=case.width, stem=case.stem)  # type: ignore[arg-type]
    net = build_contrastive(model_cfg, HeadConfig(3, 128), 3, case.side).to(device)
    cuda = device.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = build_optimizer(OptimConfig(name="lars"), net)
    for group in opt.param_groups:
        group["lr"] = 0.3  # the schedule's value does not change the work
    model = torch.compile(net) if compile else net
    n_source = 4 * case.batch  # a pool of distinct images to draw batches from
    g = torch.Generator(device).manual_seed(0)
    size = (case.side, case.side)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    if case.jpeg:
        encoded = jpeg_sources(n_source, *case.jpeg)
        # The crops are cut from the decoded image; colour, flip and blur follow.
        after_crop = dataclasses.replace(case.spec, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    else:
        images = torch.randint(0, 256, (n_source, 3, case.source, case.source),
                               dtype=torch.uint8, device=device, generator=g)

    def views_of(step: int) -> torch.Tensor:
        if case.jpeg:
            i = [(k + step * case.batch) % n_source for k in range(case.batch)]
            decoded = jpeg.decode([encoded[k] for k in i], device)
            boxes = jpeg.crop_boxes(decoded, i, 2, case.spec.crop_scale, case.spec.crop_ratio)
            crops = jpeg.crop_resize(decoded, boxes, case.side)
            v = torch.cat([augment(crops[:, k], after_crop, g, size) for k in (0, 1)])
        else:
            idx = (torch.arange(case.batch, device=device) + step * case.batch) % n_source
            x = images[idx]
            v = torch.cat([augment(x, case.spec, g, size), augment(x, case.spec, g, size)])
        return v.contiguous(memory_format=torch.channels_last) if cuda else v

    def train(views: torch.Tensor) -> None:
        with autocast:
            z = model(views)[-1]
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    # Training FLOPs per pair, counted on 2 pairs in eager mode (conv/matmul only).
    small = views_of(0)[[0, 1, case.batch, case.batch + 1]]
    with FlopCounterMode(display=False) as counter:
        with autocast:
            z = net(small)[-1]
        z1, z2 = z.float().chunk(2)
        nt_xent(z1, z2, 0.1).backward()
    flops_per_pair = counter.get_total_flops() / 2
    opt.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for s in range(warmup):  # includes compilation
        train(views_of(s))
        opt.step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warm_seconds = time.perf_counter() - started
    timers = []
    t0 = time.perf_counter()
    for s in range(steps):
        timer = Timer(device)
        timer.mark()
        views = views_of(warmup + s)
        timer.mark()
        train(views)
        timer.mark()
        opt.step()
        timer.mark()
        timers.append(timer)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    phases = [t.phases() for t in timers]
    totals = [sum(p[i] for p in phases) for i in range(3)]
    pairs_per_s = steps * case.batch / seconds
    return {
        "pairs_per_s": pairs_per_s, "batch": case.batch, "steps": steps,
        "step_ms": 1000 * seconds / steps, "warmup_s": warm_seconds,
        "augment_share": totals[0] / seconds, "fwd_bwd_share": totals[1] / seconds,
        "optim_share": totals[2] / seconds,
        "augment_ms": 1000 * statistics.median(p[0] for p in phases),
        "flops_per_pair": flops_per_pair, "tflops": flops_per_pair * pairs_per_s / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma-separated cases to time (default: all)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps (and compilation)")
    ap.add_argument("--modes", default="eager,compile", help="eager, compile or both")
    ap.add_argument("--deadline", type=float, default=270.0,
                    help="seconds after which cases not yet started are skipped")
    ap.add_argument("--smoke", action="store_true", help="a tiny case on the CPU, 2 steps")
    args = ap.parse_args()
    started = time.perf_counter()
    if args.smoke:
        device, cases, args.steps, args.warmup = torch.device("cpu"), SMOKE, 2, 1
        modes = ["eager"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine, or --smoke on a CPU", file=sys.stderr)
            return 2
        device, cases, modes = torch.device("cuda"), CASES, args.modes.split(",")
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels
        for name in args.cases.split(","):
            if name not in CASES:
                print(f"--cases: {name!r} is invalid; allowed: {', '.join(CASES)}",
                      file=sys.stderr)
                return 2
        cases = {n: CASES[n] for n in args.cases.split(",")}
    peak = peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}, datasheet dense bf16 peak "
          f"{peak or 'unknown'} TFLOP/s", flush=True)
    measured = matmul_tflops(device) if device.type == "cuda" else None
    if measured:
        print(f"8192^3 bf16 matmul: {measured:.0f} TFLOP/s", flush=True)
    for case in cases.values():
        for mode in modes:
            if time.perf_counter() - started > args.deadline:
                print(f"{case.name} {mode}: skipped (past the {args.deadline:.0f} s deadline)")
                continue
            batch = case.batch
            while True:
                try:
                    r = run_case(dataclasses.replace(case, batch=batch), device,
                                 mode == "compile", args.steps, args.warmup)
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    batch //= 2
                    print(f"{case.name} {mode}: out of memory, batch {batch} pairs", flush=True)
                    if batch < 8:
                        raise
            mfu = f", MFU {100 * r['tflops'] / peak:.1f}% of peak" if peak else ""
            mfu += f", {100 * r['tflops'] / measured:.1f}% of matmul" if measured else ""
            mem = f", peak memory {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] else ""
            print(f"{case.name} {mode}: {r['pairs_per_s']:.0f} image pairs/s (batch {r['batch']} "
                  f"pairs, {r['step_ms']:.1f} ms/step, warm-up {r['warmup_s']:.0f} s){mem}\n"
                  f"  step time: augmentation {100 * r['augment_share']:.1f}% "
                  f"({r['augment_ms']:.2f} ms), forward+loss+backward "
                  f"{100 * r['fwd_bwd_share']:.1f}%, optimiser {100 * r['optim_share']:.1f}%\n"
                  f"  {r['flops_per_pair'] / 1e9:.4g} GFLOP per pair, {r['tflops']:.1f} TFLOP/s"
                  f"{mfu}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
