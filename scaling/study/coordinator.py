"""The sweep's one actor: which trial computes which stage (leases), beside the
lanes' queue of tickets (scaling.runtime.lanes.Dispatcher), by composition."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray

from scaling.runtime.lanes import Dispatcher, Take


class Leases:
    """Which trial is computing which stage key. A claim is a lease its holder
    renews while it works; if the holder's process dies, the lease runs out and a
    waiting trial takes the stage over (its checkpoints included). Held in memory:
    after a crash of the sweep the leases are gone, and the storage is the truth."""

    def __init__(self, seconds: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.held: dict[str, tuple[str, float]] = {}

    def claim(self, key: str, trial: str) -> bool:
        holder, renewed = self.held.get(key, (trial, 0.0))
        if holder != trial and self.clock() - renewed <= self.seconds:
            return False
        self.held[key] = (trial, self.clock())
        return True

    def renew(self, key: str, trial: str) -> None:
        if self.held.get(key, ("", 0.0))[0] == trial:
            self.held[key] = (trial, self.clock())

    def release(self, key: str, trial: str) -> None:
        if self.held.get(key, ("", 0.0))[0] == trial:
            del self.held[key]


class Coordinator:
    """The sweep's one actor: the stage leases beside the lanes' queue (when stages
    run on workers). A stage in a queued or running ticket cannot be claimed. Each
    method is one the trials or the lanes call through Ray."""

    def __init__(self, lanes: int) -> None:
        self.leases, self.dispatcher = Leases(), Dispatcher(lanes)

    # The trials' side: claim a stage, renew and release the claim.
    def claim(self, key: str, trial: str) -> bool:
        return not self.dispatcher.holds(key) and self.leases.claim(key, trial)

    def renew(self, key: str, trial: str) -> None:
        self.leases.renew(key, trial)

    def release(self, key: str, trial: str) -> None:
        self.leases.release(key, trial)

    # A trial's ticket: submit it, follow it.
    def submit(self, jobs: list[dict[str, Any]], keys: list[str]) -> int:
        return self.dispatcher.submit(jobs, keys)

    def poll(self, ticket: int, seen: int) -> tuple[list[dict[str, Any]], str, str | None]:
        return self.dispatcher.poll(ticket, seen)

    # The lanes' side.
    def take(self, lane: int) -> Take:
        return self.dispatcher.take(lane)

    def report(self, ticket: int, item: dict[str, Any]) -> None:
        self.dispatcher.report(ticket, item)

    def error(self, ticket: int, message: str) -> None:
        self.dispatcher.error(ticket, message)

    def finish(self, lane: int, ticket: int) -> None:
        self.dispatcher.finish(lane, ticket)

    def run_started(self, lane: int) -> None:
        self.dispatcher.run_started(lane)

    def run_failed(self, lane: int, message: str) -> bool:
        return self.dispatcher.run_failed(lane, message)

    # The sweep's: is a lane mid-ticket, and no more work.
    def in_flight(self) -> set[str]:
        return self.dispatcher.in_flight()

    def close(self) -> None:
        self.dispatcher.close()


StageClaims: Any = ray.remote(num_cpus=0)(Coordinator)


@contextlib.contextmanager
def renewing(claims: Any, keys: list[str], trial: str) -> Iterator[None]:
    """Renew the leases on ``keys`` every 10 s while the body runs; release them after."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(10.0):
            for key in keys:
                claims.renew.remote(key, trial)

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        ray.get([claims.release.remote(key, trial) for key in keys])
