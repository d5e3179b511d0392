"""One configuration end to end: in this process (no Ray needed), or with --ray
on Ray Train (one worker group runs the stages in turn):

    python -m scaling.pipeline CONFIG.yaml|PRESET [--out runs] [--set key=value ...] [--ray]

pretrain once -> for each label fraction: fine-tune, distil, supervised baseline.
Each stage's directory is named by a hash of exactly the settings it depends on,
so re-running resumes unfinished stages and returns finished ones untouched, and
fractions share their pretraining.
"""

from __future__ import annotations

import argparse
import sys
import time

from scaling import stage_result, storage
from scaling.atomic import DiskFull
from scaling.config import ConfigError, ExperimentConfig
from scaling.configure import config_hash, load_config, parse_overrides, resolve
from scaling.data.datasets import DataError
from scaling.records import StageResult
from scaling.runtime.local import pipeline_jobs, run_pipeline
from scaling.stage_result import CheckpointError
from scaling.stages.registry import stage_runs
from scaling.stages.stage_run import NonFiniteLoss


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}"


def summary(results: list[StageResult]) -> str:
    """One screen: per stage and fraction, validation and test accuracy (probes for
    pretraining), wall time and images/s. Choices are made on the val columns."""
    rows = [f"{'stage':<11}{'labels':>8}{'val %':>7}{'test %':>8}{'kNN val/test':>14}"
            f"{'linear val/test':>17}{'train s':>9}{'img/s':>8}"]
    for r in results:
        m, p = r["metrics"], r["protocol"]
        frac = p.get("label_fraction")
        labels = "-" if r["stage"] == "pretrain" else (
            f"{100 * frac:g}%" if frac is not None else f"{p['labels_per_class']}/cl")
        knn = f"{_pct(m.get('knn_val_top1'))}/{_pct(m.get('knn_top1'))}"
        linear = f"{_pct(m.get('linear_val_top1'))}/{_pct(m.get('linear_top1'))}"
        rows.append(f"{r['stage']:<11}{labels:>8}{_pct(m.get('val_top1')):>7}"
                    f"{_pct(m.get('test_top1')):>8}{knn:>14}{linear:>17}"
                    f"{m['train_seconds']:>9.0f}{m['images_per_s']:>8.0f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaling.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML file or preset name (configs/*.yaml)")
    parser.add_argument("--out", default="runs",
                        help="root of stage outputs: a directory or a URI (s3://bucket/runs)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. pretrain.epochs=5 (repeatable)")
    parser.add_argument("--ray", action="store_true",
                        help="run the stages on Ray Train (one group of runtime.workers workers)")
    parser.add_argument("--address", default=None,
                        help="with --ray: a running cluster ('auto'); default: start one here")
    args = parser.parse_args(argv)
    if args.config is None and args.set and "=" not in args.set[-1]:
        args.config = args.set.pop()  # `--set k=v CONFIG`: --set took the config's place
    if args.config is None:
        parser.error("the following arguments are required: config")
    cfg: ExperimentConfig | None = None
    try:
        cfg = load_config(resolve(args.config), parse_overrides(args.set))
        root = storage.join(storage.absolute(storage.parse(args.out)), cfg.name)
        storage.check_writable(root, "--out")
        started = time.perf_counter()
        if args.ray:
            import ray

            from scaling.runtime.ray_train import run_stages

            ray.init(address=args.address)
            # One worker group runs the whole chain; the Ray run is named by the
            # chain's stage keys, so the same command resumes it.
            jobs = pipeline_jobs(cfg, root)
            results = run_stages(jobs, f"{cfg.name}-{config_hash([j.key for j in jobs])}")
        else:
            results = run_pipeline(cfg, root)
    except (ConfigError, DataError, NonFiniteLoss, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DiskFull as e:  # one line: where, and that the same command resumes
        print(f"error: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every write is atomic: finished stages and checkpoints stay
        if cfg is None:
            print("interrupted before anything ran", file=sys.stderr)
            return 130
        runs = stage_runs(cfg, storage.join(storage.absolute(storage.parse(args.out)), cfg.name))
        done = sum(stage_result.read_result(d) is not None for _, _, d in runs)
        print(f"interrupted after {done}/{len(runs)} stage runs; run the same command to "
              "resume", file=sys.stderr)
        return 130
    print(f"\n{cfg.name}: {len(results)} stage results in {root} "
          f"({time.perf_counter() - started:.0f} s this run)")
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
