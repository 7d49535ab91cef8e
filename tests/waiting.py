"""The one way tests wait: poll a condition (a record, a log line, a counter, a process state) until it holds.

``wait_until(predicate, timeout, what)`` returns the first truthy value ``predicate()`` gives and fails the test
with ``what`` (and the last value seen) when the deadline passes first. No test sleeps a fixed time instead.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition", period: float = 0.1,
               fail_if: Callable[[], str | None] | None = None) -> T:
    """Poll ``predicate`` every ``period`` seconds for at most ``timeout`` seconds; its first truthy value.

    :param what: what is awaited, for the failure message (or a callable giving it, for details known only then)
    :param fail_if: ``() -> reason or None``: give up at once with that reason (e.g. the process that should
        produce the event has exited: see ``Spawned.exited``)
    :raises AssertionError: when the deadline passes without a truthy value, or ``fail_if`` gives a reason
    """
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value:
        reason = fail_if() if fail_if is not None else None
        if reason or time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"{detail}: {reason or f'not within {timeout:g} s'} (last value: {value!r})")
        time.sleep(period)
        value = predicate()
    return value
