"""Ray Train start-up per stage vs per chain: one configuration's stage runs with a
worker group each (``run_stage`` per stage) against all of them on one group
(``run_stages``), in one command.

    .venv/bin/python bench/chain.py [--config tiny] [--workers 2] [--repeats 2] [--set k=v ...]

Each variant runs the whole chain (pretraining, then per label fraction
fine-tuning, distillation and the baseline) into a fresh storage, on a local Ray
started once, alternating per_stage, chain, per_stage, chain ... so that drift
shows as spread, not as a ratio. "Inside" is the stages' own wall clock
(result.json ``wall_seconds``: data, steps, evaluation); "outside" is the rest of
the variant's wall time: Train controller, worker processes, process group, the
stages' imports and data loading. Also times a worker group that runs nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402

from scaling.configure import (  # noqa: E402
    load_config,  # noqa: E402
    parse_overrides,
    resolve,
)
from scaling.runtime.local import pipeline_jobs, run_pipeline  # noqa: E402
from scaling.runtime.ray_train import run_stage, run_stages  # noqa: E402


def _noop(config: dict) -> None:
    pass


def empty_group(workers: int, storage: Path) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    TorchTrainer(_noop, scaling_config=ScalingConfig(num_workers=workers),
                 run_config=RunConfig(name="noop", storage_path=str(storage))).fit()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = parse_overrides([*args.set, "runtime.device=cpu",
                                 f"runtime.workers={args.workers}"])
    cfg = load_config(resolve(args.config), overrides)
    ray.init(num_cpus=max(args.workers, 1), include_dashboard=False, log_to_driver=False)
    rows: dict[str, list[tuple[float, float]]] = {"per_stage": [], "chain": []}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"an empty {args.workers}-worker group: "
              f"{empty_group(args.workers, Path(tmp) / 'noop'):.1f} s", flush=True)
        for i in range(args.repeats):
            for variant in rows:
                root = Path(tmp) / f"{variant}-{i}" / cfg.name
                started = time.perf_counter()
                if variant == "per_stage":
                    results = run_pipeline(cfg, root, run_stage)
                else:
                    results = run_stages(pipeline_jobs(cfg, root), "chain")
                wall = time.perf_counter() - started
                inside = sum(r["metrics"]["wall_seconds"] for r in results)
                rows[variant].append((wall, inside))
                print(f"{variant:9s} run {i}: {len(results)} stage runs, wall {wall:6.1f} s, "
                      f"inside the stages {inside:6.1f} s, outside {wall - inside:6.1f} s",
                      flush=True)
    ray.shutdown()
    med = {v: (statistics.median(w for w, _ in r), statistics.median(w - s for w, s in r))
           for v, r in rows.items()}
    print(f"\nmedians: per_stage wall {med['per_stage'][0]:.1f} s (outside "
          f"{med['per_stage'][1]:.1f} s), chain wall {med['chain'][0]:.1f} s (outside "
          f"{med['chain'][1]:.1f} s)")
    print(f"chain / per_stage: wall {med['chain'][0] / med['per_stage'][0]:.3f}, "
          f"outside the stages {med['chain'][1] / med['per_stage'][1]:.3f}")


if __name__ == "__main__":
    main()
