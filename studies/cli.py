"""The command line every studies/*.py script shares.

    python studies/model_size.py                      # the local preset, a local Ray
    python studies/model_size.py --preset fmnist-cpu --axis width=0.0625,0.125 --replicates 3
    python studies/model_size.py --file my-study.yaml --dry-run
    ray submit cluster/gpu.yaml studies/model_size.py -- --preset cifar10-gpu --storage s3://b/s

A preset names a base configuration (configs/*.yaml), overrides of it and the
axes. ``--file`` YAML may hold the same keys: preset, base, set, axes, seeds.
Everything is validated before Ray starts; a bad key or value exits with status
2 naming the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling import storage
from scaling.catalog import root_problem
from scaling.config import ConfigError, did_you_mean
from scaling.configure import load_config, parse_overrides, parse_yaml, read_yaml, resolve
from scaling.data.datasets import DataError
from scaling.stages.registry import STAGES, with_inputs
from scaling.study.cost import MFU, cluster_cost, h100_hours
from scaling.study.estimate import times_here, wall_clock
from scaling.study.folder import check_owner, study_record, with_primaries
from scaling.study.plan import (
    Study,
    cells,
    check_local,
    describe,
    distinct_runs,
    finished,
    fmt_duration,
    make_study,
    plan,
    runs_left,
    stage_flops,
)

# The `local` presets' schedule: Fashion-MNIST on 2 cores in minutes. Stages run
# inside their trial's process (workers: 0): on one machine a one-worker Ray Train
# group adds nothing Tune's trial retry does not, and with its start-up and
# tear-down for each of the 14 stage runs the local model_size sweep took 631 s
# instead of 317 s (bench/sweep.py, docs/performance.md). Fine-tuning and the
# baseline share one step budget (at least 100 steps and 5 epochs: 105 steps at 10% of
# Fashion-MNIST), and the baseline still picks its LR on validation (the
# model_size local preset adds BASELINE_GRID, fmnist-cpu's: docs/protocol.md). A
# student from scratch (no head layers, pretraining's LARS) reached 36.2% validation
# top-1 after 1 epoch of distillation and 65.5% after 4 (width 1/16, 1%; its teacher 68.0%): 4 here.
LOCAL_SCHEDULE: dict[str, Any] = {
    "pretrain.epochs": 3, "finetune.epochs": 5, "supervised.epochs": 5,
    "finetune.min_steps": 100, "supervised.min_steps": 100, "supervised.lr_grid": [0.4, 1.6],
    "distill.epochs": 4, "evaluate.linear_steps": 50, "runtime.checkpoint_every": 200,
    "runtime.workers": 0}

# The `fmnist-cpu` presets: the four findings (analysis.findings) with budgets that
# can decide them (issue 28; docs/protocol.md has the steps). The recipe the pilot
# chose on validation (`studies/recipe.py --pilot`, docs/results.md): images upscaled
# to 42 px (11x11 after the ImageNet stem) and 10 pretraining epochs, whose linear
# probe of R18 1/4x beat the pixels' on validation (85.5 vs 84.8) in less than half
# the time of 30 epochs at 28 px (84.7); fine-tuning and the baseline for at least 30
# epochs (10% labels: 630 steps) and 100 steps, each choosing its LR on validation in
# every run (fine-tuning from 0.005 and 0.02, the two that the 2026-11-29 grid's mean
# validation top-1 chose per count; the baseline from three); distillation for 40
# epochs (8,400 steps, 10x the local schedule's 840); 3 independent replicates a cell.
# The three studies share pretraining and fine-tuning in one storage.
BASELINE_GRID: dict[str, Any] = {"supervised.lr_grid": [0.1, 0.4, 1.6]}
FMNIST_CPU_SCHEDULE: dict[str, Any] = LOCAL_SCHEDULE | BASELINE_GRID | {
    "pretrain.epochs": 10, "data.image_size": 42, "finetune.epochs": 30,
    "supervised.epochs": 30, "finetune.lr_grid": [0.005, 0.02],
    "finetune.per_fraction": {}, "distill.epochs": 40}
REPLICATES: dict[str, list[Any]] = {"replicate": [0, 1, 2]}
# The findings grid of 2026-12-06 (replicates 0-2, docs/results.md): the power plan's
# spreads for these presets (--target-effect) until a storage has its own results.
FMNIST_PILOT = "docs/findings/pilot-2026-12-06.csv"




@dataclass(frozen=True)
class Preset:
    base: str  # a configs/*.yaml preset or a YAML path
    axes: dict[str, list[Any]]
    set: dict[str, Any] = field(default_factory=dict)
    stages: tuple[str, ...] | None = None  # None: the study's
    # A pilot's findings (analysis.pilot) for --target-effect when the storage has none.
    pilot: str | None = None


def findings_preset(axes: dict[str, list[Any]], stages: tuple[str, ...]) -> Preset:
    """A `fmnist-cpu` findings preset: ``axes`` x the replicates, on FMNIST_CPU_SCHEDULE."""
    return Preset("fmnist-cpu", axes | REPLICATES, FMNIST_CPU_SCHEDULE, stages=stages,
                  pilot=FMNIST_PILOT)


@dataclass(frozen=True)
class StudyDef:
    name: str
    doc: str
    presets: dict[str, Preset]
    stages: tuple[str, ...] = tuple(STAGES)
    default: str = "local"


def _values(text: str) -> list[Any]:
    return [parse_yaml(v, "--axis") for v in text.split(",") if v != ""]


def preset_of(defn: StudyDef, args: argparse.Namespace) -> Preset:
    """The preset the arguments name (--preset, else --file's, else the default)."""
    spec = (read_yaml(args.file) or {}) if args.file else {}
    return defn.presets[args.preset or spec.get("preset") or defn.default]


def build(defn: StudyDef, args: argparse.Namespace) -> Study:
    """The study the arguments describe: preset, then --file, then the flags."""
    spec: dict[str, Any] = {}
    if args.file:
        spec = read_yaml(args.file) or {}
        if not isinstance(spec, dict):
            raise ConfigError("--file", args.file, "a YAML mapping: preset, base, set, axes, seeds")
        for key in spec:
            if key not in ("preset", "base", "set", "axes", "seeds"):
                raise ConfigError(f"{args.file}: {key}", spec[key],
                                  "preset, base, set, axes, seeds")
    name = args.preset or spec.get("preset") or defn.default
    if name not in defn.presets:
        raise ConfigError("--preset", name, ", ".join(defn.presets)
                          + did_you_mean(name, defn.presets))
    preset = defn.presets[name]
    overrides = {**preset.set, **spec.get("set", {}), **parse_overrides(args.set)}
    base = load_config(resolve(spec.get("base", preset.base)), overrides)
    axes = {**preset.axes, **spec.get("axes", {})}
    for item in args.axis:
        if "=" not in item:
            raise ConfigError("--axis", item, "NAME=V1,V2,..., e.g. width=0.0625,0.125")
        key, text = item.split("=", 1)
        axes[key] = _values(text)
    seeds = spec.get("seeds")
    if args.seeds:
        seeds = _values(args.seeds)
    if args.repeats is not None:
        if args.seeds:
            raise ConfigError("--repeats", args.repeats, "either --repeats N (seeds 0..N-1) or "
                              f"--seeds (here {args.seeds}), not both")
        if args.repeats < 1:
            raise ConfigError("--repeats", args.repeats, ">= 1")
        seeds = list(range(args.repeats))
    if args.replicates is not None:
        if seeds is not None:
            raise ConfigError("--replicates", args.replicates, "either --replicates N or seeds "
                              "(--seeds, --repeats, a file's seeds), not both")
        if args.replicates < 1:
            raise ConfigError("--replicates", args.replicates, ">= 1")
        # Independent replicates replace whatever seeds and subsets the preset crossed.
        for key in ("seed", "subset_seed", "finetune.subset_seed", "replicate"):
            axes.pop(key, None)
        axes["replicate"] = list(range(args.replicates))
    if seeds is not None:
        if "replicate" in axes:
            raise ConfigError("--seeds", seeds, "no seeds beside the preset's replicate axis "
                              "(replicate r sets seed and subset to r): --replicates N instead")
        axes["seed"] = seeds
    study_name = args.name or f"{defn.name}-{name}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", study_name):
        raise ConfigError("--name", study_name, "letters, digits, '.', '_' and '-'")
    return make_study(study_name, base, axes, preset.stages or defn.stages)


def parser(defn: StudyDef) -> argparse.ArgumentParser:
    script = f"studies/{defn.name}.py"  # the examples name the study they help with
    p = argparse.ArgumentParser(prog=f"python {script}",
                                description=f"{defn.doc}\n\n{__doc__}".replace(
                                    "studies/model_size.py", script),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="one of (default " + defn.default + "): " + "; ".join(
        f"{name}: {', '.join(with_inputs(list(pre.stages or defn.stages)))}"
        for name, pre in defn.presets.items()))
    p.add_argument("--name", help=f"the study's folder in --storage (default {defn.name}-PRESET);"
                   " one name holds one configuration's results")
    p.add_argument("--file", help="a study YAML: preset, base, set, axes, seeds")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="replace an axis, e.g. --axis width=0.0625,0.125 (repeatable)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override base config keys, e.g. pretrain.epochs=5 (repeatable)")
    p.add_argument("--replicates", type=int, metavar="N",
                   help="N independent replicates 0..N-1 (replaces the preset's): replicate r "
                        "has its own pretraining seed, labelled subset and fine-tuning seed")
    p.add_argument("--seeds", help="comma-separated seeds: an axis of pretraining and "
                   "fine-tuning seeds on one labelled subset. Not independent replicates (they "
                   "share the subset's draw, so the findings count them once): for intervals "
                   "use --replicates")
    p.add_argument("--repeats", type=int, help="seeds 0..N-1, as --seeds (one labelled "
                   "subset; for intervals use --replicates)")
    p.add_argument("--storage", default=os.environ.get("SCALING_STORAGE", "runs"),
                   help="study storage: a directory or a URI (s3://bucket/studies); default "
                        "$SCALING_STORAGE (set on nodes by cluster/*.yaml), else ./runs")
    p.add_argument("--address", default=None,
                   help="Ray address; default: the running cluster if there is one "
                        "(as under ray submit), else a local Ray on this machine")
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid, the distinct stage runs and the compute; run nothing")
    p.add_argument("--resume", action="store_true",
                   help="require an earlier run's sweep state in --storage and continue it "
                        "(a plain run resumes too, but starts afresh when there is none)")
    p.add_argument("--restart-errored", action="store_true",
                   help="when resuming, run the cells that failed last time again")
    p.add_argument("--wait", action="store_true",
                   help="when another invocation is running this study (its driver holds the "
                        "study folder), wait for it to end instead of stopping")
    p.add_argument("--no-report", action="store_true",
                   help="skip writing the report at the end (the summary table still prints)")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's and Tune's own console output too (start-up, tracebacks)")
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="memory per GPU (10^9 bytes) to check the memory plan against; "
                        "default: the node types of --cluster (or of the running cluster)")
    p.add_argument("--cluster", metavar="YAML",
                   help="the cluster YAML whose GPUs the memory plan is checked against "
                        "(default for GPU presets: cluster/gpu.yaml of this checkout)")
    p.add_argument("--gpu-price", type=float, metavar="USD",
                   help="price of one GPU-hour on the cluster's GPU nodes: --dry-run then "
                        "prices the study (an assumption you state, not a quote)")
    p.add_argument("--primary", metavar="FINDINGS",
                   help="pre-register the study's primary findings before it runs, e.g. "
                        "P:1/16x,F2 (P, F1-F4 of analysis.findings; ':TEXT' keeps the rows "
                        "whose comparison contains TEXT): study.json records them with the "
                        "time; Holm's family is these, the rest is reported as exploratory. "
                        "A study with results keeps the ones it has")
    p.add_argument("--target-effect", type=float, metavar="POINTS",
                   help="with --dry-run and --primary: the replicates each primary needs to "
                        "detect this effect with 80%% power, from --pilot's spreads, and "
                        "what they cost")
    p.add_argument("--pilot", metavar="PATH",
                   help="the pilot for --target-effect: a findings CSV (python -m "
                        "analysis.findings --out) or a study folder with results "
                        "(default: this study's own results in --storage)")
    p.add_argument("--until-decided", action="store_true",
                   help="with --primary, --target-effect and --budget: add replicates in "
                        "batches (--batch) until every primary finding is decided, on a "
                        "group-sequential design fixed before the first (studies/sequential.py)")
    p.add_argument("--budget", metavar="DURATION",
                   help="--until-decided's time here, e.g. 2h30m: caps the design's size at "
                        "what the dry run's estimate says it buys")
    p.add_argument("--batch", type=int, default=3, metavar="N",
                   help="replicates between looks of --until-decided and the plan (default 3)")
    p.add_argument("--mlflow", metavar="URI",
                   help="also log each stage's curves and metrics to MLflow at this tracking "
                        "URI (file:///path/mlruns or http://server:5000); needs mlflow installed")
    return p


def _report(study_dir: Any, write: bool) -> bool:
    """The study's report (analysis/report.py, unless not ``write``), then the compact
    table and the headline, each on its own: one failing never hides the other, and
    the results are safe either way."""
    from analysis.collect import invocations, load, study_spec
    from analysis.findings import study_findings
    from analysis.headline import bottom_line, headline, results_table
    from analysis.report import write_report
    from analysis.summary import data_and_budgets

    ok = True
    if write:
        try:
            print(f"report: {write_report(study_dir)}")
        except Exception as e:  # noqa: BLE001 - never lose the sweep's exit status to a figure
            print(f"error: the report failed ({type(e).__name__}: {e}); the results are in "
                  f"{study_dir}; retry with: python -m analysis.report {study_dir}",
                  file=sys.stderr)
            ok = False
    try:
        df = load(study_dir)
        found = study_findings([df], [study_spec(study_dir)])
        print(results_table(df))
        bottom = bottom_line(df, found, invocations(study_dir), data_and_budgets(df))
        print(headline(df, found, ("F1",) if bottom else ("P", "F1")))  # P: in the bottom line
        # Last: the few lines a reader takes away (also the report's first).
        print(bottom)
    except Exception as e:  # noqa: BLE001
        print(f"error: the summary table failed ({type(e).__name__}: {e}); the results are "
              f"in {study_dir}", file=sys.stderr)
        ok = False
    return ok


def interrupted(study: Study | None, root: str) -> int:
    """Ctrl-C: say how far the study got and how to go on; exit status 130."""
    if study is None:
        print("interrupted before anything ran", file=sys.stderr)
    else:
        runs = distinct_runs(study)
        done = len(finished(study, storage.absolute(storage.parse(root)), runs))
        print(f"interrupted after {done}/{sum(map(len, runs.values()))} stage runs; run the "
              "same command to resume", file=sys.stderr)
    return 130


def checks(study: Study, args: argparse.Namespace) -> list[str]:
    """What would stop the study after it started, found now: a data root that is not
    there, a stage run that does not fit its GPU's memory. Prints the memory plan of
    a GPU study; returns every problem (the caller exits 2 on any)."""
    from scaling.study import memory

    found = []
    configs = [c.config for c in cells(study)]
    datas = {c.data for c in configs} | {c.distill.unlabelled for c in configs
                                         if c.distill.unlabelled}
    for data in sorted(datas, key=repr):
        problem = root_problem(data.name, data.root, data.download)
        if problem:
            found.append(f"{problem} (checked on this machine; the run reads it on the "
                         "training nodes)")
    cfg = study.base
    if cfg.runtime.gpus_per_worker > 0 or args.gpu_memory is not None:
        yaml_path = args.cluster or (None if cluster_running(args) else
                                     memory.default_cluster_yaml())
        limit = memory.gpu_limit(cfg, args.gpu_memory, yaml_path)
        runs = memory.memory_plan(study)
        print(memory.describe_memory(runs, limit, cfg), flush=True)
        found += memory.problems(runs, limit, cfg)
    return found


def cluster_running(args: argparse.Namespace) -> bool:
    """Under ray submit (or --address): the head node's own config says the GPUs."""
    return bool(args.address or os.environ.get("RAY_ADDRESS"))


def dry_run(study: Study, args: argparse.Namespace, default_pilot: str | None = None) -> str:
    """What a run would do: the checks it makes before Ray, the stage runs already in
    the storage, and how long the rest takes here (measured) or on GPUs (assumed)."""
    root = storage.absolute(storage.parse(args.storage))
    rt = study.base.runtime
    on_cluster = args.address or os.environ.get("RAY_ADDRESS")
    if not on_cluster and rt.gpus_per_worker == 0:
        check_local(study.base)  # a CPU preset runs here: refuse what the run would
    study_dir = storage.join(root, study.name)
    check_owner(study_dir, with_primaries(study_dir, study_record(study), _primaries(args)))
    runs = distinct_runs(study)
    done = finished(study, root, runs)
    left = runs_left(runs, done)
    per = ", ".join(f"{s} {sum((s, k) in done for k in keyed)}/{len(keyed)}"
                    for s, keyed in runs.items())
    lines = [f"in {root}: {len(done)} of {sum(map(len, runs.values()))} stage runs finished "
             f"({per}); {len(left)} to run"]
    if args.target_effect is not None:
        lines += power_plan(study, args, study_dir, default_pilot)
    if not left:
        return "\n".join(lines)
    flops = sum(stage_flops(c, s) for s, c in left)
    if times_here(study.base):
        est = wall_clock(left)
        rates = ", ".join(f"{m} {r / 1e9:.1f}" for m, r in est.rates.items())
        lines.append(f"estimated time here ({est.device}): ~{fmt_duration(est.seconds)} of "
                     f"training steps for the {len(left)} to run (GFLOP/s: {rates}; "
                     f"{est.provenance()}); evaluation and start-up come on top")
    if rt.gpus_per_worker > 0:
        lines.append(f"estimated training compute to run: {flops:.3g} FLOPs (~"
                     f"{h100_hours(flops):.3g} H100-hours at an assumed {MFU:.0%} of bf16 peak)")
        priced = _cluster_cost(study, args, flops)
        if priced:
            lines.append(priced)
    return "\n".join(lines)


def _primaries(args: argparse.Namespace) -> list[str] | None:
    from analysis.findings import parse_primaries

    return parse_primaries(args.primary) if args.primary else None


def pilot_rows(args: argparse.Namespace, study_dir: Any, default_pilot: str | None
               ) -> tuple[str, Any] | None:
    """(the pilot, its spreads: analysis.pilot.spreads): --pilot, else the study's own
    results, else the preset's pilot; None where there is none."""
    from analysis.pilot import spreads

    pilot = args.pilot or str(study_dir)
    try:
        return pilot, spreads(pilot)
    except (FileNotFoundError, ValueError):
        if args.pilot or default_pilot is None:
            return None
        pilot = str(Path(__file__).resolve().parents[1] / default_pilot)  # in this checkout
        return pilot, spreads(pilot)


def one_replicate(study: Study) -> list[tuple[str, Any]]:
    """The distinct stage runs of one replicate of ``study`` (all of them, run or not)."""
    one = make_study(study.name, study.base, {**{k: list(v) for k, v in study.axes},
                                              "replicate": [0]}, study.stages)
    return runs_left(distinct_runs(one), set())


def power_plan(study: Study, args: argparse.Namespace, study_dir: Any,
               default_pilot: str | None = None) -> list[str]:
    """The dry run's power plan (analysis.pilot): replicates per primary finding to
    detect --target-effect, and their cost: time here, or H100-hours (and $ at
    --gpu-price) on GPUs, from one replicate's distinct stage runs."""
    from analysis.pilot import plan_lines

    primaries = _primaries(args)
    if primaries is None:
        raise ConfigError("--target-effect", args.target_effect,
                          "with --primary FINDINGS: the findings the plan is for")
    found = pilot_rows(args, study_dir, default_pilot)
    if found is None:
        return [f"power plan: no pilot results in {args.pilot or study_dir}; pass --pilot "
                "with a findings CSV or a study folder that has results"]
    pilot, rows = found
    runs = one_replicate(study)
    on_gpus = study.base.runtime.gpus_per_worker > 0
    # One replicate's cost, estimated once (here it times steps on the spot).
    per = h100_hours(sum(stage_flops(c, s) for s, c in runs)) if on_gpus else (
        wall_clock(runs).seconds)

    def cost(n: int) -> str:
        if on_gpus:
            price = f", ${n * per * args.gpu_price:,.0f}" if args.gpu_price else ""
            return f"~{n * per:.3g} H100-hours{price}"
        return f"~{fmt_duration(n * per)} of training steps here"

    return [f"pilot: {pilot}", *plan_lines(rows, primaries, args.target_effect, cost,
                                           batch=args.batch)]


def until_decided(defn: StudyDef, study: Study, args: argparse.Namespace) -> int:
    """--until-decided: the sequential design (studies/sequential.py), run look by look."""
    from analysis.collect import load
    from analysis.findings import findings
    from analysis.pilot import primary_rows
    from scaling.study import sweep
    from studies import sequential

    primaries = _primaries(args)
    if primaries is None or args.target_effect is None or args.budget is None:
        raise ConfigError("--until-decided", True, "with --primary, --target-effect and "
                          "--budget: the findings, the effect to detect and the time to spend")
    budget = sequential.parse_duration(args.budget)
    root = storage.absolute(storage.parse(args.storage))
    study_dir = storage.join(root, study.name)
    found = pilot_rows(args, study_dir, preset_of(defn, args).pilot)
    if found is None:
        raise ConfigError("--pilot", args.pilot, "a findings CSV or a study folder with results")
    pilot, rows = found
    rows = primary_rows(rows, primaries).dropna(subset=["sd"])
    if rows.empty:
        raise ConfigError("--primary", args.primary, f"findings the pilot {pilot} measured "
                          "with at least 2 replicates")
    per_replicate = wall_clock(one_replicate(study)).seconds
    plan = sequential.design([float(v) for v in rows["sd"]], args.target_effect, args.batch,
                             per_replicate, budget) | {"pilot": pilot}
    first = dict(study.axes).get("replicate", (0,))
    start = int(min(first))
    plan["replicates"] = list(range(start, start + plan["looks"][-1]))
    axes = {k: list(v) for k, v in study.axes}
    full = make_study(study.name, study.base, axes | {"replicate": plan["replicates"]},
                      study.stages)
    print(f"sequential design: replicates {plan['replicates'][0]}..{plan['replicates'][-1]}, "
          f"looks at {plan['looks']}, levels {[round(x, 4) for x in plan['levels']]} (sum "
          f"0.05); plan {plan['planned']} replicates, the budget buys "
          f"{int(budget // per_replicate)} at ~{fmt_duration(per_replicate)} each", flush=True)

    def look(n: int, level: float) -> Any:
        sub = make_study(study.name, study.base, axes | {"replicate": plan["replicates"][:n]},
                         study.stages)
        outcome = sweep.run_study(sub, args.storage, address=args.address,
                                  mlflow=args.mlflow, verbose=args.verbose,
                                  primaries=primaries, design=full, sequential=plan,
                                  wait=args.wait)
        if outcome.interrupted:
            raise KeyboardInterrupt
        return findings([load(study_dir)], primaries, level)

    sequential.run_looks(plan, look, say=lambda line: print(line, flush=True))
    print(f"results table: {storage.join(study_dir, 'results.csv')}")
    return 0 if _report(study_dir, write=not args.no_report) else 1


def _cluster_cost(study: Study, args: argparse.Namespace, flops: float) -> str | None:
    """The estimate on the cluster YAML's GPUs: hours of wall clock, and a price."""
    from scaling.study import cluster, memory

    yaml_path = args.cluster or (None if cluster_running(args) else memory.default_cluster_yaml())
    config = cluster.load(yaml_path) if yaml_path else cluster.bootstrap_config()
    if config is None:
        return None
    priced = cluster_cost(study, config, flops, args.gpu_price)
    return None if priced is None else f"estimated {priced.line()}"


def main(defn: StudyDef, argv: list[str] | None = None) -> int:
    args = parser(defn).parse_args(argv)
    study = None
    try:
        study = build(defn, args)
        print(describe(study, plan(study)), flush=True)
        found = checks(study, args)  # before Ray: data roots, and whether the GPUs hold it
        if args.dry_run:
            print(dry_run(study, args, preset_of(defn, args).pilot))
        for problem in found:
            print(f"error: {problem}", file=sys.stderr)
        if found or args.dry_run:
            return 2 if found else 0
        if args.until_decided:
            return until_decided(defn, study, args)
        from scaling.study import sweep

        outcome = sweep.run_study(study, args.storage, address=args.address,
                                  restart_errored=args.restart_errored, resume=args.resume,
                                  mlflow=args.mlflow, verbose=args.verbose,
                                  primaries=_primaries(args), wait=args.wait)
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the sweep started
        return interrupted(study, args.storage)
    if outcome.interrupted:
        return interrupted(study, args.storage)
    print(sweep.summary(outcome, study))
    study_dir = storage.join(storage.absolute(storage.parse(args.storage)), study.name)
    print(f"results table: {storage.join(study_dir, 'results.csv')}")
    reported = outcome.table.empty or _report(study_dir, write=not args.no_report)
    return 1 if outcome.errored or not reported else 0


def _n(x: float) -> str:
    return f"{round(x):,}" if x >= 100 else f"{x:.3g}"


def cost_table(defs: list[StudyDef], config: dict) -> str:
    """docs/cluster.md's cost table: every GPU preset's distinct stage runs (and the
    naive grid's), its H100-hours, and its GPU-hours and least wall clock on the
    node types of cluster ``config``: the dry run's own numbers."""
    lines = ["| study, preset | stage runs (naive grid) | H100-hours | on gpu.yaml: node, "
             "GPU-hours | wall clock, at least |", "|---|---|---|---|---|"]
    for defn in defs:
        for name in defn.presets:
            if not name.endswith("-gpu"):
                continue
            study = build(defn, parser(defn).parse_args(["--preset", name]))
            p = plan(study)
            c = cluster_cost(study, config, p.flops)
            where = f"{c.instance}, {_n(c.gpu_hours)}" if c else "-"
            wall = f"{_n(c.hours)} h on {c.gpus_at_once} GPUs" if c else "-"
            lines.append(f"| {defn.name} {name} | {p.stage_runs} ({p.naive_stage_runs}) | "
                         f"{_n(h100_hours(p.flops))} | {where} | {wall} |")
    return "\n".join(lines)
