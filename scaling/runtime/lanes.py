"""Lanes: long-lived Ray Train worker groups that run many cells' stages in turn.

A sweep whose stages run on workers (``runtime.workers > 0``) starts one lane per
slot as it starts. A lane is one TorchTrainer whose workers loop: rank 0 takes the
next ticket (the StageJobs a cell's trial submitted) from the sweep's Dispatcher,
every worker runs it (``ray_train.run_jobs``), rank 0 marks it done, and the group
takes the next, until the sweep closes the dispatcher. The group's start-up
(controller, worker processes, process group: 15-30 s) is paid once per lane, not
once per cell. Trials stay one per cell (Tune's table, per-cell errors,
``--restart-errored`` and resume are unchanged); a trial submits its ticket, waits
for it, and relays the stages' progress and events to Tune (``run_on_lane``).

Failures: a worker that raises records the error on its ticket, and the group
fails; Ray Train restarts it (``runtime.max_failures`` per lane run) and rank 0
takes the same ticket again: its stages resume from their checkpoints. A lane run
out of restarts fails its ticket with the recorded error (the cell's trial raises
it; Tune retries the cell once) and the lane starts a new run. A run that fails
before it took any ticket ends the lane; once every lane has ended, queued tickets
fail with its error instead of waiting forever.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scaling import storage
from scaling.config import RuntimeConfig
from scaling.records import StageResult
from scaling.runtime.local import StageJob
from scaling.runtime.ray_train import (
    ERROR_FILE,
    After,
    Watch,
    collect,
    restore,
    restore_from_runs,
    run_jobs,
    trainer,
    worker_env,
)
from scaling.storage import Location

POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Ticket:
    """What a cell's trial submitted: its stage jobs, in dependency order."""

    number: int
    jobs: tuple[dict[str, Any], ...]  # StageJob.encode() each
    keys: tuple[str, ...]


@dataclass
class Progress:
    """Where a ticket is: its state, rank 0's events so far, the first error."""

    state: str = "queued"  # queued, running, done, failed
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Closed:
    """take()'s answer once the sweep has no more work: the lane's run ends."""


Take = Ticket | Closed | None  # None: nothing queued yet, ask again


class Dispatcher:
    """The queue between the cells' trials and the lanes (held by one actor). Pure
    bookkeeping: tickets in submission order, each lane's current ticket."""

    def __init__(self, lanes: int) -> None:
        self.tickets: dict[int, Ticket] = {}
        self.progress: dict[int, Progress] = {}
        # Stage keys of queued and running tickets, kept as they change: a claim asks
        # for every key, and a sweep holds thousands of finished tickets.
        self.busy: dict[str, int] = {}  # key -> queued or running tickets holding it
        self.queue: deque[int] = deque()
        self.current: dict[int, int | None] = dict.fromkeys(range(lanes))
        self.took: dict[int, int] = dict.fromkeys(range(lanes), 0)  # in the lane's run
        self.ended: dict[int, str] = {}  # lane -> why it gave up
        self.closed = False

    def submit(self, jobs: list[dict[str, Any]], keys: list[str]) -> int:
        ticket = len(self.tickets)
        self.tickets[ticket] = Ticket(ticket, tuple(jobs), tuple(keys))
        self.progress[ticket] = Progress()
        for key in keys:
            self.busy[key] = self.busy.get(key, 0) + 1
        if len(self.ended) == len(self.current):
            self._fail(ticket, self._why_ended())
        else:
            self.queue.append(ticket)
        return ticket

    def in_flight(self) -> set[str]:
        """Stage keys of tickets queued or running: nobody else may claim them, not
        even a retry of the trial that submitted them (its ticket still runs)."""
        return set(self.busy)

    def holds(self, key: str) -> bool:
        """Whether a queued or running ticket holds ``key`` (in_flight, for one key)."""
        return key in self.busy

    def take(self, lane: int) -> Take:
        """Rank 0 of ``lane`` asks what to run: its current ticket again (the group
        restarted mid-ticket), the next queued one, None (wait) or Closed()."""
        if (ticket := self.current[lane]) is None and self.queue:
            ticket = self.current[lane] = self.queue.popleft()
            self.progress[ticket].state = "running"
            self.took[lane] += 1
        if ticket is not None:
            return self.tickets[ticket]
        return Closed() if self.closed else None

    def report(self, ticket: int, item: dict[str, Any]) -> None:
        self.progress[ticket].events.append(item)

    def error(self, ticket: int, message: str) -> None:
        """A worker's exception on ``ticket``: the first is kept (it is the cause)."""
        self.progress[ticket].error = self.progress[ticket].error or message

    def finish(self, lane: int, ticket: int) -> None:
        self._end(ticket, "done")
        self.current[lane] = None

    def poll(self, ticket: int, seen: int) -> tuple[list[dict[str, Any]], str, str | None]:
        """Events after the first ``seen``, the state, and the error if it failed."""
        p = self.progress[ticket]
        return p.events[seen:], p.state, p.error if p.state == "failed" else None

    def run_started(self, lane: int) -> None:
        self.took[lane] = 0

    def run_failed(self, lane: int, message: str) -> bool:
        """The lane's TorchTrainer ran out of restarts. Fails its ticket; True: start
        a new run; False: the run never got to a ticket, so the lane ends."""
        if (ticket := self.current[lane]) is not None:
            self.current[lane] = None
            self._fail(ticket, self.progress[ticket].error or message)
            return True
        if self.took[lane]:
            return True
        self.ended[lane] = message
        if len(self.ended) == len(self.current):  # nobody left to run the queue
            while self.queue:
                self._fail(self.queue.popleft(), self._why_ended())
        return False

    def close(self) -> None:
        self.closed = True

    def _fail(self, ticket: int, message: str) -> None:
        self._end(ticket, "failed")
        self.progress[ticket].error = message

    def _end(self, ticket: int, state: str) -> None:
        if self.progress[ticket].state in ("queued", "running"):
            for key in self.tickets[ticket].keys:
                self.busy[key] -= 1
                if not self.busy[key]:
                    del self.busy[key]
        self.progress[ticket].state = state

    def _why_ended(self) -> str:
        return "no lane could start its worker group: " + next(iter(self.ended.values()))


def serve(lane: int, dispatcher: str, rt: RuntimeConfig, ray_storage: str, name: str) -> None:
    """A lane's life (a Ray task): TorchTrainer runs until the dispatcher closes."""
    import ray

    handle = ray.get_actor(dispatcher)
    # ``name`` is lane-<i>-<invocation>: runs of this invocation hold "-<invocation>-".
    config = {"dispatcher": dispatcher, "lane": lane, "ray_storage": ray_storage,
              "invocation": "-" + name.split("-", 2)[-1] + "-"}
    for run in itertools.count(1):
        ray.get(handle.run_started.remote(lane))
        try:
            trainer(_lane_worker, config, rt, f"{name}-{run}", ray_storage).fit()
            return
        except Exception as e:  # Ray's TrainingFailedError, after max_failures restarts
            if not ray.get(handle.run_failed.remote(lane, f"{type(e).__name__}: {e}")):
                return


def _lane_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed

    handle = ray.get_actor(config["dispatcher"])
    lane = config["lane"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    while True:
        # Rank 0 asks; every worker hears the answer. Idle workers meet in this
        # broadcast every POLL_SECONDS, so no collective waits long enough to time out.
        msg = [ray.get(handle.take.remote(lane)) if rank == 0 else None]
        if world > 1:
            torch.distributed.broadcast_object_list(msg, src=0,
                                                    device=ray.train.torch.get_device())
        if msg[0] is None:
            time.sleep(POLL_SECONDS)
            continue
        if isinstance(msg[0], Closed):
            return
        ticket = msg[0].number
        jobs = [StageJob.decode(j) for j in msg[0].jobs]
        base = worker_env(jobs[0].cfg.runtime, progress_lines=False)
        restore(jobs)  # this run's latest checkpoint (the group restarted mid-ticket)
        restore_from_runs(jobs, config["ray_storage"], config["invocation"])  # an earlier one's

        def event(e: Any, ticket: int = ticket) -> None:
            if rank == 0:
                handle.report.remote(ticket, dict(e))

        try:
            run_jobs(jobs, base, event, report=lambda job, m: event(m))
        except Exception as e:
            ray.get(handle.error.remote(ticket, f"{type(e).__name__}: {e}"))
            raise
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            ray.get(handle.finish.remote(lane, ticket))


def run_on_lane(dispatcher: Any, jobs: Sequence[StageJob], report: Watch,
                after: After | None = None) -> list[StageResult]:
    """Submit ``jobs`` to the lanes and wait; ``report`` hears rank 0's progress and
    each stage's events, ``after`` runs here as each stage finishes. Returns the
    results (``ray_train.collect``: a non-finite loss raises NonFiniteLoss)."""
    import ray

    if not jobs:
        return []
    by_key = {j.key: j for j in jobs}
    found: dict[Location, StageResult | None] = {}  # read once, as each stage finishes
    for job in jobs:
        storage.delete(job.out, ERROR_FILE)
    ticket = ray.get(dispatcher.submit.remote([j.encode() for j in jobs], list(by_key)))
    seen = 0
    while True:
        events, state, error = ray.get(dispatcher.poll.remote(ticket, seen))
        seen += len(events)
        for e in events:
            if e.get("event") == "executed":
                job = by_key[e["key"]]
                found[job.out] = result = collect([job])[0]
                if after is not None:
                    after(job, result)
            report(e, None)
        if state == "failed":
            raise RuntimeError(f"the lane running {', '.join(j.stage for j in jobs)} "
                               f"failed: {error}")
        if state == "done":
            return collect(jobs, found)
        time.sleep(POLL_SECONDS)
