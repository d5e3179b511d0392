"""One live driver per study folder (scaling.study.lease): a second driver stops in
one line naming the first, waits with --wait, and takes over a dead one's lease."""

import json
import threading
import time

import pytest

from scaling.study import lease as lease_mod
from scaling.study.lease import FILE, Lease, StudyBusy


def test_a_second_driver_stops_naming_the_first_and_the_first_releases(tmp_path):
    first = Lease(tmp_path, "demo", "python -m scaling.study.watch X").acquire()
    held = json.loads((tmp_path / FILE).read_text())
    with pytest.raises(StudyBusy, match=f"driver pid {held['pid']} on .*watch it with "
                                        "python -m scaling.study.watch X.*--wait"):
        Lease(tmp_path, "demo", "python -m scaling.study.watch X").acquire()
    first.release()
    assert not (tmp_path / FILE).exists()
    with Lease(tmp_path, "demo", "w").acquire() as again:  # free again
        assert again.took_over is None and (tmp_path / FILE).exists()
    assert not (tmp_path / FILE).exists()


def test_a_dead_drivers_lease_is_taken_over_and_a_waiter_starts_when_it_ends(tmp_path,
                                                                              monkeypatch):
    (tmp_path / FILE).write_text(json.dumps({"host": "gone", "pid": 1, "token": "x",
                                             "started": "then",
                                             "heartbeat": time.time() - 3600}))
    taken = Lease(tmp_path, "demo", "w").acquire()
    assert taken.took_over is not None and taken.took_over["host"] == "gone"
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(
        Lease(tmp_path, "demo", "w").acquire(wait=True, poll=0.05)))
    waiter.start()
    time.sleep(0.5)
    assert not got  # still held
    taken.release()
    waiter.join(timeout=10)
    assert got and got[0].took_over is None
    got[0].release()


def test_the_heartbeat_keeps_a_lease_alive_past_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(lease_mod, "TIMEOUT_S", 0.3)
    held = Lease(tmp_path, "demo", "w").acquire()
    time.sleep(0.8)  # well past the timeout: alive only if renewed
    with pytest.raises(StudyBusy):
        Lease(tmp_path, "demo", "w").acquire()
    held.release()


def test_a_driver_of_this_host_that_is_gone_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    gone = int(done.stdout)  # a process that ran here and has ended
    (tmp_path / FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": gone,
                                             "token": "x", "started": "now",
                                             "heartbeat": time.time()}))
    taken = Lease(tmp_path, "demo", "w").acquire()
    assert taken.took_over is not None and taken.took_over["pid"] == gone
    taken.release()
