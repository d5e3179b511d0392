"""The project's batched SimCLR augmentation vs torchvision's per-sample v2 pipeline.

    .venv/bin/python bench/augment.py [--batches 20] [--device cpu]

Both make two views of the same uint8 images with the same recipe (random
resized crop, flip, colour jitter with p, grayscale with p, blur with p;
bilinear resize without antialiasing, as in the reference and ours), to float
in [0, 1]. Per-sample torchvision runs (i) in the main process and (ii) in a
DataLoader with one worker per core, the way a per-sample pipeline is normally
fed; batched runs on the device with torch's threads. Cases:
  fmnist  Fashion-MNIST train images, 1x28x28, the fmnist-cpu recipe
  rgb32   3x32x32 uint8 noise (CIFAR's shape), the paper's CIFAR recipe
  rgb224  3x256x256 noise -> 224 crops, the ImageNet recipe (blur p=0.5)
Then the share of a pretraining step spent in augmentation, measured inside
real steps of the fmnist-cpu model (fetch, two views, forward, NT-Xent,
backward, LARS step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from scaling.configure import load_config, resolve
from scaling.data.augment import ViewSpec, augment, view_spec
from scaling.data.datasets import ImageData
from scaling.data.loaders import load_dataset
from scaling.model.network import build_contrastive
from scaling.train.losses import nt_xent
from scaling.train.optimizer import build_optimizer

CASES: dict[str, tuple[int, int, int, ViewSpec, int]] = {
    # name: (channels, source side, output side, recipe, batch)
    "fmnist": (1, 28, 28, ViewSpec(crop_scale=(0.2, 1.0), color_strength=0.5), 256),
    "rgb32": (3, 32, 32, ViewSpec(color_strength=0.5), 256),
    "rgb224": (3, 256, 224, ViewSpec(color_strength=1.0, blur_p=0.5), 64),
}


def torchvision_view(spec: ViewSpec, out: int) -> v2.Compose:
    """One view, per image, with torchvision v2 ops in the reference's order."""
    s = spec.color_strength
    steps: list[Any] = [
        v2.RandomResizedCrop(out, scale=spec.crop_scale, ratio=spec.crop_ratio,
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=False),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=spec.color_p),
        v2.RandomGrayscale(p=spec.grayscale_p),
    ]
    if spec.blur_p:
        side = out // 10 // 2 * 2 + 1  # ~10% of the side, odd
        steps.append(v2.RandomApply([v2.GaussianBlur(side, spec.blur_sigma)], p=spec.blur_p))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


class TwoViews(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, images: torch.Tensor, view: v2.Compose) -> None:
        self.images, self.view = images, view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(self.images[i]), self.view(self.images[i])


def images_for(case: str, n: int) -> torch.Tensor:
    channels, side = CASES[case][:2]
    if case == "fmnist":
        train = load_dataset("fashion-mnist", "train")
        assert isinstance(train, ImageData)
        return train.images[:n]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=g)


def rate(fn: Callable[[int], None], batches: int, batch: int, sync: Callable[[], None]) -> float:
    """Views per second of ``fn(b)`` (two views of batch b), after one warm-up batch."""
    fn(0)
    sync()
    started = time.perf_counter()
    for b in range(1, batches + 1):
        fn(b)
    sync()
    return 2 * batches * batch / (time.perf_counter() - started)


def bench_case(case: str, batches: int, device: torch.device, workers: int) -> dict[str, float]:
    _, _, out, spec, batch = CASES[case]
    images = images_for(case, batch * (batches + 1))
    on_device = images.to(device)
    gen = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size = (out, out)

    def batched(b: int) -> None:
        x = on_device[b * batch:(b + 1) * batch]
        augment(x, spec, gen, size), augment(x, spec, gen, size)

    view = torchvision_view(spec, out)

    def per_sample(b: int) -> None:
        pairs = [(view(img), view(img)) for img in images[b * batch:(b + 1) * batch]]
        torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    result = {"batched": rate(batched, batches, batch, sync),
              "torchvision": rate(per_sample, max(2, batches // 4), batch, sync)}
    # Made only now: its workers start prefetching at once and would compete
    # with the measurements above.
    loader = torch.utils.data.DataLoader(TwoViews(images, view), batch_size=batch,
                                         num_workers=workers)
    stream = iter(loader)
    result["torchvision_loader"] = rate(lambda b: next(stream), batches, batch, sync)
    return result


def step_share(steps: int, device: torch.device) -> dict[str, float]:
    """Time in augmentation / time per pretraining step, the fmnist-cpu model and recipe."""
    cfg = load_config(resolve("fmnist-cpu"))
    p = cfg.pretrain
    train = load_dataset("fashion-mnist", "train")
    assert isinstance(train, ImageData)
    images = train.images.to(device)
    torch.manual_seed(0)
    net = build_contrastive(cfg.model, cfg.head, 1, 28).to(device)
    opt = build_optimizer(p.optim, net)
    gen = torch.Generator(device).manual_seed(0)
    spec = view_spec(p.augment)
    order = np.random.default_rng(0).permutation(len(images))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    aug_s, step_s = [], []
    for s in range(steps + 3):  # 3 warm-up steps
        sync()
        t0 = time.perf_counter()
        x = images[torch.from_numpy(order[s * p.batch_size:(s + 1) * p.batch_size]).to(device)]
        views = torch.cat([augment(x, spec, gen), augment(x, spec, gen)])
        sync()
        t1 = time.perf_counter()
        z = net(views)[-1]
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, p.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if s >= 3:
            aug_s.append(t1 - t0)
            step_s.append(t2 - t0)
    return {"augment_ms": 1000 * statistics.median(aug_s),
            "step_ms": 1000 * statistics.median(step_s),
            "share": sum(aug_s) / sum(step_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20, help="augmentation batches timed")
    parser.add_argument("--steps", type=int, default=30, help="pretraining steps timed")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated cases to time (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the augmentation runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    workers = len(os.sched_getaffinity(0))
    print(f"{torch.get_num_threads()} torch threads, DataLoader workers {workers}, "
          f"{args.device}, torch {torch.__version__}", flush=True)
    print(f"{'case':8s} {'batched':>10s} {'tv main':>10s} {'tv loader':>10s}  (views/s)  "
          "batched/tv main  batched/tv loader")
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"--cases: {case!r} is invalid; allowed: {', '.join(CASES)}")
        r = bench_case(case, args.batches, device, workers)
        print(f"{case:8s} {r['batched']:10.0f} {r['torchvision']:10.0f} "
              f"{r['torchvision_loader']:10.0f}  {'':9s}  {r['batched'] / r['torchvision']:14.1f}"
              f"  {r['batched'] / r['torchvision_loader']:17.1f}", flush=True)
    share = step_share(args.steps, device)
    print(f"\npretraining step (fmnist-cpu, batch 256 pairs): {share['step_ms']:.1f} ms median, "
          f"augmentation {share['augment_ms']:.1f} ms; share of step time in augmentation "
          f"{100 * share['share']:.1f}%")


if __name__ == "__main__":
    main()
