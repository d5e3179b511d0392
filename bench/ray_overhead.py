"""Pretraining throughput on Ray Train (1 worker) against the single-process stage.

Same model, batch, data and thread count, in one command:

    .venv/bin/python bench/ray_overhead.py [--config fmnist-cpu] [--epochs 1]

Runs single, Ray, single again (the spread of the two single runs is the noise).
Prints images/s (image pairs, training steps only) of each and their ratio, and
the Ray run's start-up + tear-down: the driver's fit() time minus the worker's
own wall time for the stage.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from scaling.config import load_config
from scaling.pipeline import resolve
from scaling.pretrain import pretrain
from scaling.ray_train import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fmnist-cpu")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    cfg = load_config(resolve(args.config), {
        "pretrain.epochs": args.epochs, "runtime.device": "cpu", "runtime.log_every": 1000,
        "runtime.workers": 1, "runtime.cpus_per_worker": threads,  # same threads on Ray
        "evaluate.linear_steps": 1, "evaluate.knn_k": 1,
    })
    with tempfile.TemporaryDirectory() as tmp:
        local = pretrain(cfg, Path(tmp) / "local")
        ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter()
        on_ray = run_stage("pretrain", cfg, Path(tmp) / "ray")
        fit_seconds = time.perf_counter() - started
        ray.shutdown()
        # Once more after Ray, so warm-up and order effects show up as spread.
        again = pretrain(cfg, Path(tmp) / "again")
    a, b, c = local["metrics"], on_ray["metrics"], again["metrics"]
    print(f"config {args.config}: R{cfg.model.depth} w{cfg.model.width} "
          f"batch {cfg.pretrain.batch_size}, {local['step']} steps, {threads} threads, "
          f"{cfg.data.name}")
    print(f"single process  {a['images_per_s']:8.1f} pairs/s  ({a['train_seconds']:.1f} s)")
    print(f"Ray, 1 worker   {b['images_per_s']:8.1f} pairs/s  ({b['train_seconds']:.1f} s)")
    print(f"single, again   {c['images_per_s']:8.1f} pairs/s  ({c['train_seconds']:.1f} s)")
    plain = (a["images_per_s"] + c["images_per_s"]) / 2
    print(f"ratio Ray / mean of single runs {b['images_per_s'] / plain:.3f}")
    print(f"Ray start-up + tear-down {fit_seconds - b['wall_seconds']:.1f} s "
          f"(fit {fit_seconds:.1f} s, worker stage wall {b['wall_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
