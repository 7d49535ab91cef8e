"""The stage's compute worker: one thread, updates and backwards before forwards, busy time per kind; and the
emulated slower device (``peer.slowdown``) it, the baseline and the pipeline use."""

import threading
import time

import pytest

from peer.slowdown import idle_after, mark
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


def spin(seconds: float) -> None:
    """Compute (a busy loop) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_idle_after_keeps_the_emulated_device_busy_factor_times_as_long():
    for cpu_time in (True, False):
        started = mark()
        spin(0.05)
        computed = time.perf_counter() - started[0]
        idle_after(started, 3.0, cpu_time)
        idled = time.perf_counter() - started[0] - computed
        assert 0.9 * 2 * computed <= idled <= 1.5 * 2 * computed + 0.2, cpu_time  # (F - 1) times the compute
    long_ago = (time.perf_counter() - 100.0, time.thread_time() - 100.0)  # a factor <= 1 returns at once
    for factor in (1.0, 0.5):
        t0 = time.perf_counter()
        idle_after(long_ago, factor)
        assert time.perf_counter() - t0 < 0.05, factor


def test_time_off_the_cpu_does_not_slow_the_emulated_device_further():
    """A thread that waited 0.1 s for a core next to 0.05 s of compute: by CPU time the device was busy 3 x 0.05 s,
    so it idles only what remains of that; by wall time the wait would be multiplied too."""

    def waited_then_computed() -> tuple[float, float]:
        wall, cpu = mark()
        spin(0.05)
        return wall - 0.1, cpu  # the mark as if taken 0.1 s earlier, off the CPU (other processes held the cores)

    started = waited_then_computed()
    idle_after(started, 3.0, cpu_time=True)
    by_cpu = time.perf_counter() - started[0]
    assert by_cpu < 0.15 + 0.04, by_cpu  # max(wall, 3 x CPU) = 0.15 s, not 3 x 0.15 s
    started = waited_then_computed()
    idle_after(started, 3.0, cpu_time=False)
    assert time.perf_counter() - started[0] >= 0.9 * 3 * 0.15
