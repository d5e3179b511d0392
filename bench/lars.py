"""LARS: the per-parameter reference loop against the multi-tensor update, and the
optimiser's share of a pretraining step of a ResNet with its projection head.

    .venv/bin/python bench/lars.py [--depth 50] [--width 1] [--batch 32] [--size 32]

One network, its gradients from one real forward+backward (NT-Xent on two random
views), then ``--repeats`` rounds of: a forward+backward, ``--steps`` reference
steps, ``--steps`` multi-tensor steps (each optimiser with its own momentum
buffers, same parameters). Prints the medians, the ratio reference / multi-tensor,
and the optimiser's share of a whole step (forward+backward+update) with each.
The update's cost does not depend on the batch or the image size; its share does,
so the command line states both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from scaling.config import HeadConfig, ModelConfig
from scaling.model.network import build_contrastive
from scaling.train.lars import LARS, param_groups
from scaling.train.losses import nt_xent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, n: int) -> float:
    """Seconds per call, over ``n`` calls."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--head-layers", type=int, default=3, help="the paper's deeper head")
    p.add_argument("--batch", type=int, default=32, help="image pairs per step")
    p.add_argument("--size", type=int, default=32, help="image side (small stem <= 32)")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps timed per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds; medians are printed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    net = build_contrastive(ModelConfig(depth=args.depth, width=args.width),
                            HeadConfig(num_layers=args.head_layers), 3, args.size).to(device)
    x = torch.rand(2 * args.batch, 3, args.size, args.size, device=device)

    def forward_backward() -> None:
        net.zero_grad(set_to_none=True)
        z1, z2 = net(x)[-1].float().chunk(2)
        nt_xent(z1, z2, 0.1).backward()

    forward_backward()
    tensors = sum(1 for q in net.parameters() if q.grad is not None)
    # lr 0: the update's arithmetic in full, the weights unchanged round to round.
    opts = {name: LARS(param_groups(net, 1e-6), lr=0.0, momentum=0.9, foreach=foreach)
            for name, foreach in (("reference", False), ("foreach", True))}
    for opt in opts.values():
        opt.step()  # momentum buffers allocated outside the timing
    times: dict[str, list[float]] = {"forward+backward": [], **{k: [] for k in opts}}
    for _ in range(args.repeats):
        times["forward+backward"].append(timed(forward_backward, device, 1))
        for name, opt in opts.items():
            times[name].append(timed(opt.step, device, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"ResNet-{args.depth} width {args.width:g} + {args.head_layers}-layer head, "
          f"{tensors} tensors with gradients, {sum(q.numel() for q in net.parameters()):,} "
          f"parameters; batch {args.batch} pairs at {args.size} px on {device} "
          f"({torch.get_num_threads()} threads); medians of {args.repeats} rounds")
    fb = med["forward+backward"]
    print(f"  forward+backward   {1e3 * fb:9.1f} ms")
    for name in opts:
        share = med[name] / (fb + med[name])
        print(f"  LARS {name:<13} {1e3 * med[name]:9.2f} ms  ({100 * share:.1f}% of the step)")
    print(f"  reference / foreach: {med['reference'] / med['foreach']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
