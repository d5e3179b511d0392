"""How the study machinery holds at a research group's scale, simulated on this
machine with no training (the stage work is a stub that returns at once):

    .venv/bin/python bench/scale.py [plan] [coordinator] [lookup] [--quick]

- plan: what a study does before Ray starts (``--dry-run`` and ``run_study``):
  expand and validate the grid, count the distinct stage runs and their FLOPs,
  look each up in the storage, key every cell, order the cells. Seconds and the
  growth of peak RSS, a fresh process per grid, for grids of 100 to 10,000 cells
  (the model-size study's local preset, replicates added).
- coordinator: the sweep's one actor (Leases beside the lanes' Dispatcher) under
  2,000 tickets: 64 lanes (coroutines of one async Ray actor) take tickets, run
  nothing and finish them; 128 trials (coroutines of another) claim each stage
  key, submit a ticket, and poll it as ``run_on_lane`` does. Claims per second at
  each lane count, and the time from a ticket's end to the lane's next start.
- lookup: ``restore_from_runs`` (a stage's checkpoints from an earlier
  invocation's Ray Train runs) on a moto S3 server holding 0 to 500 earlier runs:
  LIST calls (``storage.list_dirs``, one ListObjectsV2 each) and seconds per ticket.

Each part prints a table; docs/performance.md has the curves and what was fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --- plan --------------------------------------------------------------------------

def _config(preset: str) -> Any:
    try:
        from scaling.configure import load_config, resolve
    except ImportError:  # before 2026-12-07 (the "before" column of docs/performance.md)
        from scaling.config import load_config  # type: ignore[attr-defined,no-redef]
        from scaling.pipeline import resolve  # type: ignore[attr-defined,no-redef]
    return load_config(resolve(preset))


def plan_once(n: int) -> None:
    """One grid of ``n`` cells, in this (fresh) process: prints the line."""
    import resource

    from scaling.study import plan
    from scaling.study.folder import study_record

    base = _config("fmnist-cpu")
    axes = {"depth": [18], "width": [0.0625, 0.125, 0.25],
            "label_fraction": [0.001, 0.01, 0.1], "replicate": list(range(n // 9))}
    # The FLOP counts per model are cached: count them before the clock starts.
    plan.plan(plan.make_study("warm", base, dict(axes, replicate=[0])))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        t = [time.perf_counter()]
        study = plan.make_study("scale", base, axes, ("pretrain", "finetune", "supervised",
                                                      "pixels"))
        t.append(time.perf_counter())
        runs = plan.distinct_runs(study)
        p = plan.plan(study)
        t.append(time.perf_counter())
        plan.finished(study, Path(tmp), runs)
        t.append(time.perf_counter())
        study_record(study)
        plan.grid_hash(study)
        t.append(time.perf_counter())
        plan.schedule_order(study, plan.cells(study))
        t.append(time.perf_counter())
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024  # KiB -> MiB
    steps = [b - a for a, b in zip(t, t[1:], strict=False)]
    print(f"{p.cells:>6} " + " ".join(f"{s:>10.2f}" for s in steps)
          + f" {t[-1] - t[0]:>9.2f} {grown:>12.0f}", flush=True)


def plan_part(sizes: list[int]) -> None:
    import subprocess

    print("cells  expand+check    plan    lookup keys+record    order   total s  "
          "peak RSS +MiB")
    for n in sizes:  # a process each: its peak memory is its own
        subprocess.run([sys.executable, __file__, "--plan-cells", str(n)], check=True)


# --- coordinator -------------------------------------------------------------------

def _ticket_number(taken: Any) -> int | None:
    """A lane's take(): a Ticket (now) or (number, jobs) (before 2026-12-07)."""
    if taken is None or isinstance(taken, str) or type(taken).__name__ == "Closed":
        return None
    return taken.number if hasattr(taken, "number") else taken[0]


def _closed(taken: Any) -> bool:
    return taken == "closed" or type(taken).__name__ == "Closed"


def coordinator_part(lanes_list: list[int], tickets: int, trials: int) -> None:
    import ray

    try:
        from scaling.study.coordinator import StageClaims
    except ImportError:  # before the coordinator had its own module
        from scaling.study.sweep import StageClaims  # type: ignore[no-redef]
    poll = 0.5  # as scaling.runtime.lanes (POLL_SECONDS) and run_on_lane

    @ray.remote(num_cpus=0)
    class Lanes:
        async def run(self, name: str, lanes: int) -> dict[str, Any]:
            claims = ray.get_actor(name)
            gaps: list[float] = []

            async def lane(i: int) -> None:
                ended = None
                while True:
                    taken = await claims.take.remote(i)
                    if _closed(taken):
                        return
                    number = _ticket_number(taken)
                    if number is None:
                        await asyncio.sleep(poll)
                        continue
                    if ended is not None:
                        gaps.append(time.perf_counter() - ended)
                    await claims.report.remote(number, {"event": "executed"})
                    await claims.finish.remote(i, number)
                    ended = time.perf_counter()

            await asyncio.gather(*(lane(i) for i in range(lanes)))
            return {"gaps": gaps}

    @ray.remote(num_cpus=0)
    class Trials:
        async def run(self, name: str, tickets: int, trials: int) -> dict[str, Any]:
            claims = ray.get_actor(name)
            claim_times: list[tuple[float, float]] = []  # (start, seconds), each claim
            todo = iter(range(tickets))

            async def trial() -> None:
                for t in todo:
                    keys = [f"stage-{t}-{s}" for s in range(3)]  # a cell's 3 stages
                    for key in keys:
                        started = time.perf_counter()
                        assert await claims.claim.remote(key, f"trial-{t}")
                        claim_times.append((started, time.perf_counter() - started))
                    number = await claims.submit.remote([{"stage": k} for k in keys], keys)
                    seen = 0
                    while True:
                        events, state, _ = await claims.poll.remote(number, seen)
                        seen += len(events)
                        if state == "done":
                            break
                        await asyncio.sleep(poll)
                    for key in keys:
                        await claims.release.remote(key, f"trial-{t}")

            await asyncio.gather(*(trial() for _ in range(trials)))
            return {"claims": claim_times}

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    print(f"{tickets} tickets (3 stage keys each), {trials} trials polling every {poll} s")
    print("lanes  wall s  tickets/s  claims/s  claim ms (median, p95; first 500 / last 500 "
          "claims)  ticket end -> lane's next start s (median, p95)")
    for lanes in lanes_list:
        name = f"scale-claims-{lanes}"
        claims = StageClaims.options(name=name).remote(lanes)
        lane_host, trial_host = Lanes.remote(), Trials.remote()
        started = time.perf_counter()
        served = lane_host.run.remote(name, lanes)
        done = ray.get(trial_host.run.remote(name, tickets, trials))
        wall = time.perf_counter() - started
        ray.get(claims.close.remote())
        gaps = ray.get(served)["gaps"]
        took = [s for _, s in sorted(done["claims"])]

        def ms(xs: list[float]) -> str:
            xs = sorted(xs)
            return f"{1e3 * statistics.median(xs):.1f}, {1e3 * xs[int(0.95 * len(xs))]:.1f}"

        print(f"{lanes:>5} {wall:>7.1f} {tickets / wall:>10.1f} {3 * tickets / wall:>9.0f}  "
              f"{ms(took[:500]):>14} / "
              f"{ms(took[-500:]):<14}{'':>24}{statistics.median(gaps):.2f}, "
              f"{sorted(gaps)[int(0.95 * len(gaps))]:.2f}", flush=True)
        for actor in (claims, lane_host, trial_host):
            ray.kill(actor)
    ray.shutdown()


# --- lookup ------------------------------------------------------------------------

def lookup_part(runs_list: list[int], tickets: int) -> None:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
                      SCALING_SCRATCH=tempfile.mkdtemp(prefix="scale-scratch-"))
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bucket")

    from scaling import storage
    from scaling.runtime import ray_train
    from scaling.runtime.local import StageJob

    calls = [0]
    listing = storage.list_dirs

    def counted(location: Any) -> list[str]:
        calls[0] += 1
        return listing(location)

    storage.list_dirs = counted  # ray_train calls it as storage.list_dirs
    cfg = _config("tiny")
    print(f"{tickets} tickets in one process (a lane), each a stage with no checkpoint of "
          "its own on this node")
    print("earlier runs  first ticket: LIST calls, s   each later ticket: LIST calls, s")
    root, made = "s3://bucket/study", 0
    train = f"{root}/_train"
    for runs in runs_list:
        # Earlier runs hold 4 stages' checkpoints each, none of the tickets' stages.
        for r in range(made, runs):
            for s in range(4):
                s3.put_object(Bucket="bucket", Key=f"study/_train/lane-0-{r}-1/"
                              f"pretrain-{r:04d}{s}@step-000000004/checkpoint.pt", Body=b"x")
        made = runs
        jobs = [StageJob("pretrain", cfg, f"{root}/stages/pretrain-{runs}ticket{t:04d}")
                for t in range(tickets)]
        getattr(ray_train, "_run_listings", {}).clear()  # a fresh lane process
        took = []
        for job in jobs:  # a ticket of one stage each
            calls[0], started = 0, time.perf_counter()
            ray_train.restore_from_runs([job], train)
            took.append((calls[0], time.perf_counter() - started))
        later = took[1:]
        print(f"{runs:>12} {took[0][0]:>19} {took[0][1]:>6.3f} "
              f"{sum(c for c, _ in later) / len(later):>26.1f} "
              f"{sum(t for _, t in later) / len(later):>6.3f}", flush=True)
    server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", default=["plan", "coordinator", "lookup"])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--plan-cells", type=int, help=argparse.SUPPRESS)  # plan_part's child
    args = ap.parse_args()
    if args.plan_cells:
        plan_once(args.plan_cells)
        return
    q = args.quick
    for part in args.parts:
        print(f"\n== {part} ==", flush=True)
        if part == "plan":
            plan_part([99, 999] if q else [99, 999, 2997, 9999])
        elif part == "coordinator":
            coordinator_part([8] if q else [8, 16, 32, 64], 100 if q else 2000, 128)
        elif part == "lookup":
            lookup_part([0, 20] if q else [0, 50, 100, 250, 500], 5 if q else 20)
        else:
            sys.exit(f"part={part!r}; allowed: plan, coordinator, lookup")


if __name__ == "__main__":
    main()
