"""One live driver per study folder.

Two invocations of one study into one storage would run the same Tune experiment
directory from two drivers, which Tune does not support. A driver holds the study
folder's lease, ``driver.json`` (its host, pid, start time and a heartbeat it renews
every HEARTBEAT_S seconds), for as long as it runs. A second invocation finds a live
lease and stops in one line naming the first and how to watch it, or waits for it
with ``--wait``. A lease whose driver is gone is taken over, and the takeover says
so: at once where the driver ran on this host and its process no longer exists, else
when its heartbeat has stopped for TIMEOUT_S (a lost node).

It works wherever the storage does (a local folder, S3): a read, a write and a
read-back. Two drivers starting within the same second can both write; the
read-back leaves one owner, and the other stops as if it had found the lease.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from scaling import storage
from scaling.config import ConfigFileError
from scaling.storage import Location

FILE = "driver.json"
HEARTBEAT_S = 10.0
TIMEOUT_S = float(os.environ.get("SCALING_LEASE_TIMEOUT", 60.0))


class StudyBusy(ConfigFileError):
    """Another live driver holds the study folder."""

    def __init__(self, message: str) -> None:
        super().__init__("--name", message)


def _me(token: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}


def holder(study_dir: Location) -> dict[str, Any] | None:
    """The lease as stored, or None."""
    text = storage.read_text(study_dir, FILE)
    try:
        return None if text is None else dict(json.loads(text))
    except ValueError:
        return None  # a torn write of another era: no owner


def _dead_here(lease: dict[str, Any]) -> bool:
    """A driver of this host whose process is gone (a crash, a SIGKILL): no need to
    wait out its heartbeat."""
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False


def alive(lease: dict[str, Any] | None, now: float | None = None) -> bool:
    """Held by a driver that runs: its heartbeat is recent, and where it ran on this
    host, its process still exists."""
    return (lease is not None and (now or time.time()) - float(lease["heartbeat"]) < TIMEOUT_S
            and not _dead_here(lease))


class Lease:
    """Held from ``acquire`` to ``release`` (a context manager), renewed by a thread."""

    def __init__(self, study_dir: Location, study: str, watch_hint: str) -> None:
        self.study_dir, self.study, self.hint = study_dir, study, watch_hint
        self.token = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None

    def _busy(self, other: dict[str, Any]) -> StudyBusy:
        return StudyBusy(
            f"the study {self.study!r} is running: driver pid {other['pid']} on "
            f"{other['host']}, started {other['started']}, holds {self.study_dir}/{FILE}; "
            f"watch it with {self.hint}, or pass --wait to start when it ends (a driver "
            f"whose heartbeat stops for {TIMEOUT_S:.0f} s is taken over)")

    def acquire(self, wait: bool = False, poll: float = 5.0) -> Lease:
        while True:
            other = holder(self.study_dir)
            if other is not None and alive(other) and other.get("token") != self.token:
                if not wait:
                    raise self._busy(other)
                time.sleep(poll)
                continue
            self.took_over = other if other is not None and not alive(other) else None
            storage.write_text(self.study_dir, FILE, json.dumps(_me(self.token)))
            time.sleep(0.2)  # then read back: of two simultaneous writers one stays
            mine = holder(self.study_dir)
            if mine is not None and mine.get("token") == self.token:
                break
            if not wait and mine is not None:
                raise self._busy(mine)
        self._thread = threading.Thread(target=self._beat, name="study-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            lease = holder(self.study_dir)
            if lease is None or lease.get("token") != self.token:
                return  # taken over (we looked dead): stop renewing someone else's lease
            lease["heartbeat"] = time.time()
            storage.write_text(self.study_dir, FILE, json.dumps(lease))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
        lease = holder(self.study_dir)
        if lease is not None and lease.get("token") == self.token:
            storage.delete(self.study_dir, FILE)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
