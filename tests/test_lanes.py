"""The lanes' queue (scaling.runtime.lanes.Dispatcher) as pure bookkeeping: what a
lane's rank 0 is handed, after a restart, after a run out of restarts, and when no
lane can start. The lanes themselves run in tests/test_sweep.py."""

from scaling.runtime.lanes import Closed, Dispatcher, Ticket


def jobs(name: str) -> list[dict]:
    return [{"stage": name}]


def ticket(number: int, name: str) -> Ticket:
    return Ticket(number, tuple(jobs(name)), (f"k{name}",))


def test_tickets_go_out_in_order_and_a_restarted_group_gets_its_ticket_again():
    d = Dispatcher(lanes=2)
    a, b, c = d.submit(jobs("a"), ["ka"]), d.submit(jobs("b"), ["kb"]), d.submit(jobs("c"), ["kc"])
    assert d.take(0) == ticket(a, "a") and d.take(1) == ticket(b, "b")
    assert d.in_flight() == {"ka", "kb", "kc"}
    # lane 0's group restarted mid-ticket: rank 0 asks again and resumes the same one
    assert d.take(0) == ticket(a, "a")
    d.report(a, {"event": "start"})
    d.report(a, {"event": "executed"})
    assert d.poll(a, 0) == ([{"event": "start"}, {"event": "executed"}], "running", None)
    d.finish(0, a)
    assert d.poll(a, 1) == ([{"event": "executed"}], "done", None)
    assert "ka" not in d.in_flight()
    assert d.take(0) == ticket(c, "c")
    d.finish(0, c)
    assert d.take(0) is None  # nothing queued: wait
    d.close()
    assert d.take(0) == Closed()
    assert d.take(1) == ticket(b, "b")  # closing does not take a running ticket away


def test_a_run_out_of_restarts_fails_its_ticket_with_the_workers_error_and_goes_on():
    d = Dispatcher(lanes=1)
    a, b = d.submit(jobs("a"), ["ka"]), d.submit(jobs("b"), ["kb"])
    d.run_started(0)
    assert d.take(0) == ticket(a, "a")
    d.error(a, "RuntimeError: worker 1 ran out of memory")
    d.error(a, "DistBackendError: peer gone")  # a consequence, not the cause
    assert d.run_failed(0, "TrainingFailedError: ...") is True  # a new run starts
    assert d.poll(a, 0) == ([], "failed", "RuntimeError: worker 1 ran out of memory")
    d.run_started(0)
    assert d.take(0) == ticket(b, "b")
    assert d.in_flight() == {"kb"}


def test_lanes_that_cannot_start_fail_the_queue_instead_of_waiting_forever():
    d = Dispatcher(lanes=2)
    a = d.submit(jobs("a"), ["ka"])
    d.run_started(0)
    d.run_started(1)
    assert d.run_failed(0, "RuntimeError: no GPU") is False  # before any ticket: lane ends
    assert d.poll(a, 0)[1] == "queued"  # lane 1 may still take it
    assert d.run_failed(1, "RuntimeError: no GPU") is False
    assert d.poll(a, 0) == ([], "failed", "no lane could start its worker group: "
                            "RuntimeError: no GPU")
    late = d.submit(jobs("b"), ["kb"])
    assert d.poll(late, 0)[1] == "failed" and d.in_flight() == set()


def test_a_run_that_failed_between_tickets_starts_again():
    d = Dispatcher(lanes=1)
    a = d.submit(jobs("a"), ["ka"])
    d.run_started(0)
    d.take(0)
    d.finish(0, a)
    assert d.run_failed(0, "ActorDiedError: node lost while idle") is True
