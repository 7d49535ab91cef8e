"""The compute worker: one thread owns the device and runs stage work one job at a time.

Jobs wait in a priority queue: updates and backward passes go before new forwards, so
the activations held for pending backwards are released as soon as possible and memory
stays bounded by the in-flight cap. Within a priority, jobs run in arrival order.

``slowdown`` F > 1 emulates a slower device (tests and benchmarks: ``--compute-slowdown``): after
each forward or backward job the worker idles until the job has taken F times its compute time
(``peer.slowdown``: the worker thread's CPU time when ``cpu_time``, else the wall time), so the
stage's measured throughput falls by F. Updates (averaging, mostly network) are not slowed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

from peer.slowdown import idle_after, mark

logger = logging.getLogger(__name__)

UPDATE, BACKWARD, FORWARD = 0, 1, 2
JOB_NAMES = {UPDATE: "update", BACKWARD: "backward", FORWARD: "forward"}


class ComputeWorker:
    def __init__(self, name: str = "stage-compute", slowdown: float = 1.0, cpu_time: bool = False):
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown must be >= 1, got {slowdown}")
        self.slowdown, self.cpu_time = slowdown, cpu_time
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._stopped = False
        self.busy_s = {name: 0.0 for name in JOB_NAMES.values()}  # seconds spent running each kind of job
        self._thread.start()

    @property
    def queue_size(self) -> int:
        return self._queue.qsize()

    def submit(self, fn: Callable[[], Any], priority: int = FORWARD) -> concurrent.futures.Future:
        """Queue ``fn``; the future resolves to ``(result, seconds waited in the queue)``."""
        if self._stopped:
            raise RuntimeError("compute worker is stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((priority, next(self._order), fn, future, time.perf_counter()))
        return future

    async def run(self, fn: Callable[[], Any], priority: int = FORWARD) -> tuple[Any, float]:
        """``submit`` for asyncio callers: ``(result, queue seconds)``."""
        return await asyncio.wrap_future(self.submit(fn, priority))

    def _loop(self) -> None:
        while True:
            priority, _, fn, future, queued_at = self._queue.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            started = mark()
            waited = started[0] - queued_at
            try:
                result, error = fn(), None
            except BaseException as e:  # the caller decides what an error means
                result, error = None, e
            if priority != UPDATE:  # an emulated slower device: as busy, as long
                idle_after(started, self.slowdown, self.cpu_time)
            self.busy_s[JOB_NAMES[priority]] += time.perf_counter() - started[0]  # counted before the caller hears
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((result, waited))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued jobs, then end the thread."""
        if not self._stopped:
            self._stopped = True
            self._queue.put((UPDATE + 100, next(self._order), None, None, 0.0))
            self._thread.join(timeout)
