"""The stage's compute worker: one thread, updates and backwards before forwards, busy time per kind."""

import threading
import time

import pytest

from peer.stage.worker import BACKWARD, FORWARD, UPDATE, ComputeWorker


@pytest.fixture
def worker():
    w = ComputeWorker("test-compute")
    yield w
    w.stop()


def test_updates_and_backwards_go_before_forwards(worker):
    gate, order = threading.Event(), []
    blocker = worker.submit(lambda: gate.wait(5), FORWARD)  # holds the thread while the others queue
    futures = [worker.submit(lambda name=name: order.append(name), priority)
               for name, priority in (("forward", FORWARD), ("backward", BACKWARD), ("update", UPDATE))]
    gate.set()
    assert blocker.result(5)[0] is True
    for f in futures:
        f.result(5)
    assert order == ["update", "backward", "forward"]
    assert futures[0].result()[1] > 0  # the forward waited in the queue


def test_busy_time_is_counted_per_kind_and_errors_reach_the_caller(worker):
    worker.submit(lambda: time.sleep(0.05), BACKWARD).result(5)
    worker.submit(lambda: time.sleep(0.02), FORWARD).result(5)
    failing = worker.submit(lambda: 1 / 0, UPDATE)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    assert worker.busy_s["backward"] >= 0.05 and worker.busy_s["forward"] >= 0.02
    assert worker.busy_s["update"] > 0  # counted too, though it failed at once
    assert worker.submit(lambda: "still serving", FORWARD).result(5)[0] == "still serving"


def test_a_slowdown_emulates_a_slower_device_for_forward_and_backward_only():
    slow = ComputeWorker("slow-compute", slowdown=3.0)
    try:
        job = lambda: time.sleep(0.05)  # noqa: E731 (the "compute" of one job)
        started = time.perf_counter()
        slow.submit(job, FORWARD).result(5)
        slow.submit(job, BACKWARD).result(5)
        took = time.perf_counter() - started
        slow.submit(job, UPDATE).result(5)
    finally:
        slow.stop()
    assert took >= 3 * 0.1  # each job held the worker three times its compute time
    assert slow.busy_s["forward"] >= 0.15 and slow.busy_s["backward"] >= 0.15  # and counts as busy
    assert slow.busy_s["update"] < 0.15  # averaging is network-bound: not slowed
    with pytest.raises(ValueError, match="slowdown"):
        ComputeWorker("bad", slowdown=0.5)
