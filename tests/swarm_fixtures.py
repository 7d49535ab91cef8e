"""Fixtures for tests that run real swarms on localhost (registered in conftest.py as a plugin).

* ``reaper`` (autouse): after every test, kills the child processes the test left behind
  (DHT processes, p2pd daemons, command subprocesses), and fails that test.
* ``run_id``: a fresh run id per test, so tests sharing a DHT never see each other's records.
* ``dht_swarm``: a :class:`dht.testing.LocalSwarm` of two nodes on 127.0.0.1 for that run.
* ``spawn``: start a command as a subprocess whose output goes to files; killed at teardown.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from peer.processes import alive as _alive
from peer.processes import descendants as all_descendants
from peer.processes import reap
from waiting import wait_until


SHUTDOWN_GRACE_S = 5.0  # a child still shutting down (a DHT process, p2pd) after its test: not a leak yet
PROCESS_SINGLETONS = ("torch_shm_manager",)
"""Helpers a library starts once per process and keeps (killing torch's breaks tensor sharing later on)."""


def _is_singleton(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return False
    return os.path.basename(argv0) in PROCESS_SINGLETONS


def descendants(pid: int | None = None) -> set[int]:
    """Every live process below ``pid`` (default: this one), library singletons excluded."""
    return {p for p in all_descendants(pid) if not _is_singleton(p)}


@pytest.fixture(autouse=True)
def reaper():
    """Kill the processes a test leaves behind (after a grace period for ones that are shutting down) and fail it."""
    before = descendants()
    yield
    leftover = descendants() - before
    if not leftover:
        return
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while time.monotonic() < deadline and any(_alive(p) for p in leftover):
        time.sleep(0.1)
    killed = reap(leftover)
    if killed:  # a leak is the leaking test's failure, not a warning someone may read
        pytest.fail(f"the test left {len(killed)} child process(es) running (killed now): {sorted(killed)}")


@pytest.fixture(scope="session", autouse=True)
def _session_reaper():
    yield
    reap(descendants(), grace=2.0)


async def _local_storage(_dht, node, key: str) -> dict:
    """Runs inside a DHT process: its local storage (not its cache) under ``key``, signatures stripped."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.routing import DHTID
    from hivemind.utils import MSGPackSerializer

    found = node.protocol.storage.get(DHTID.generate(source=key))
    if found is None:
        return {}
    strip = RSASignatureValidator._SIGNATURE_RE.sub
    return {subkey: MSGPackSerializer.loads(strip(b"", value))
            for subkey, (value, _expiration) in found.value.items()}


def stored_records(node, key: str) -> dict:
    """``{subkey: value}`` that one :class:`dht.node.SwarmNode` itself stores under ``key``."""
    return node.dht.run_coroutine(functools.partial(_local_storage, key=key))


@pytest.fixture
def run_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def dht_swarm(run_id):
    """Two DHT nodes of ``run_id`` on 127.0.0.1 (``.nodes``, ``.initial_peers``, ``.add_node()``)."""
    from dht.testing import LocalSwarm

    with LocalSwarm(run_id, size=2) as swarm:
        yield swarm


class Spawned:
    """A subprocess with stdout/stderr in files, so a test can wait for a line without blocking on a pipe."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.out_path, self.err_path = workdir / f"{uuid.uuid4().hex[:6]}.out", workdir / f"{uuid.uuid4().hex[:6]}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, env={**os.environ, **(env or {})})

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def exited(self) -> str | None:
        """None while the process runs; else how it ended, with the tail of its stderr (``wait_until``'s
        ``fail_if``: an event this process should produce will not come)."""
        if self.proc.poll() is None:
            return None
        return f"the process exited with code {self.proc.returncode}:\n{self.stderr[-3000:]}"

    def wait_for_stdout(self, predicate, timeout: float = 60.0) -> str:
        """Poll stdout until ``predicate(text)``; fails the test if the process exits or time runs out."""
        return wait_until(lambda: self.stdout if predicate(self.stdout) else None, timeout,
                          lambda: f"expected output; stdout:\n{self.stdout}\nstderr:\n{self.stderr[-2000:]}",
                          fail_if=self.exited)

    def kill(self) -> None:
        """SIGKILL the process and all its descendants at once, as when its machine vanishes. Killing only the
        process would leave its hivemind child processes running (orphans the fixture can no longer find)."""
        for pid in descendants(self.proc.pid) | {self.proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail(f"process did not stop within {timeout} s of {signal.Signals(sig).name}")


@pytest.fixture
def spawn(tmp_path):
    """``spawn(args, env=None) -> Spawned``; every process still running at teardown is killed with its children."""
    started: list[Spawned] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> Spawned:
        started.append(Spawned([str(a) for a in args], tmp_path, env))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            reap(descendants(s.proc.pid) | {s.proc.pid})
