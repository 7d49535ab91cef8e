"""Process control shared by the launchers (``swarm-peer demo``, the pipeline launcher), the priority helper
and the tests: the process tree from ``/proc``, signals that tolerate a process that is already gone, and
the stop sequence every launcher uses (SIGTERM, a shared grace period, then SIGKILL of the whole group).

Each launched command runs in its own session (``start_new_session=True``), so its process group holds
its helpers too (hivemind's DHT and averager processes, p2pd, a pipeline worker's threads); SIGKILL goes
to that group so nothing is left behind. SIGTERM goes to the process alone when it shuts its helpers
down in order itself (stage peers, trainers), or to the group when every member handles it (pipeline
workers).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Callable, Iterable

logger = logging.getLogger(__name__)
KILLED_WAIT_S = 10.0  # how long a SIGKILLed process may take to be reaped


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may contain spaces
        except (OSError, IndexError, ValueError):  # exited while we looked
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int | None = None) -> set[int]:
    """Every process below ``pid`` (default: this one): children, their children, ... (Linux /proc)."""
    children, out, todo = _children(), set(), [pid or os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def send(proc: subprocess.Popen, sig: int, *, group: bool) -> None:
    """``sig`` to a running ``proc`` (to its whole process group with ``group``); nothing if it has exited."""
    if proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def stop_all(procs: Iterable[subprocess.Popen], grace: float, *, term_group: bool,
             on_kill: Callable[[subprocess.Popen], None] | None = None) -> None:
    """SIGTERM every process in order, give them ``grace`` seconds together, then SIGKILL the process group of
    each one still running (``on_kill(proc)`` is told first). Returns once every process has exited."""
    procs = list(procs)
    for proc in procs:
        send(proc, signal.SIGTERM, group=term_group)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(proc)
            send(proc, signal.SIGKILL, group=True)
            proc.wait(timeout=KILLED_WAIT_S)


def reap(pids: set[int], grace: float = 3.0) -> set[int]:
    """SIGTERM ``pids`` (processes we may not have started), SIGKILL what is left after ``grace`` seconds.

    :returns: the pids that were alive
    """
    living = {p for p in pids if alive(p)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in living:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(alive(p) for p in living) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in living:  # collect our own zombies
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
    return living
