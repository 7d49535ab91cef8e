"""Emulated links on one machine: every emulated host is a network namespace whose only way out is a
link with a bandwidth and a one-way latency, emulated in userspace.

Why userspace: this kernel has ``tbf`` and ``htb`` but not ``netem``, so nothing in ``tc`` adds latency.
So each host gets a TUN device (``swp0``, 10.77.0.N/16) instead of a veth, and one router process
(this file, ``route``) holds the other end of every TUN: it reads each IP packet a host sends, and
writes it into the destination host's TUN once the packet has crossed

    the sender's uplink (queue, then size / bandwidth), the sender's latency,
    the receiver's downlink (queue, then size / bandwidth), the receiver's latency.

So a host's profile is its access link, and applies to everything it sends and receives (gRPC,
the DHT and averaging, gloo): between two hosts of 100 Mbit/s and 25 ms, one way takes 50 ms and a
round trip 100 ms. Queues are drop-tail, bounded to ``QUEUE_S`` of the link's bandwidth (at least
``QUEUE_MIN_BYTES``), as a real access link's buffer is: TCP finds a link's rate by its losses. With
a 0.1 s buffer one bulk flow over a 100 ms round trip got 75% of a 100 Mbit/s link; with 0.5 s, 95%.
The TUN MTU is large (``MTU``), so that the router handles a few hundred packets per second, not
tens of thousands, at these rates. A measurement (:meth:`World.measure`) runs ``STREAMS`` bulk flows
at once, as ``iperf -P`` does: one flow's sawtooth alone reads a link ~10% slow.

Traffic stays inside the namespaces; :class:`World` removes them (and stops the router) on exit, also
after an exception or Ctrl-C, and removes the namespaces that a killed run left behind at the next start.

    with World({"a": Profile(100, 25), "b": Profile(100, 25)}) as world:
        world.run("a", ["python", "-m", "http.server", "--bind", world.address("a")])
        print(world.measure("b", "a"))  # {"rtt_ms": ..., "mbit_s": ...}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import glob
import heapq
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time

PREFIX = "swp"  # namespaces are named swp<pid>-<host>, so a later run can tell a dead run's leftovers
DEVICE = "swp0"
SUBNET = "10.77.0"
MTU = 16384
QUEUE_S = 0.5  # drop-tail queue of each link direction, in seconds of its bandwidth (see the module docstring)
QUEUE_MIN_BYTES = 4 * MTU
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
SETUP_TIMEOUT_S = 30.0
STATS_PERIOD_S = 0.5  # how often the router writes its traffic counts


@dataclasses.dataclass(frozen=True)
class Profile:
    """A host's access link: bandwidth in Mbit/s each way (None: unlimited) and one-way latency in ms."""

    mbit: float | None = None
    latency_ms: float = 0.0

    def describe(self) -> str:
        return f"{self.mbit:g} Mbit/s, {self.latency_ms:g} ms" if self.mbit else f"unlimited, {self.latency_ms:g} ms"


def available() -> str | None:
    """Why links cannot be emulated here (None: they can)."""
    if os.geteuid() != 0:
        return "emulated links need root (network namespaces and TUN devices)"
    if not shutil.which("ip"):
        return "emulated links need iproute2's `ip`"
    if not os.path.exists("/dev/net/tun"):
        return "emulated links need /dev/net/tun"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=SETUP_TIMEOUT_S)


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def namespaces() -> set[str]:
    """The network namespaces of this module's worlds (this run's and others'), by name."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=SETUP_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)}


def _owner_gone(name: str) -> bool:
    """Whether the run named in ``swp<pid>-...`` is gone."""
    owner = name[len(PREFIX):].split("-", 1)[0]
    return owner.isdigit() and not os.path.exists(f"/proc/{owner}")


def remove_leftovers() -> list[str]:
    """Remove the namespaces (and router counts) of runs whose process is gone; returns the namespaces' names."""
    removed = sorted(name for name in namespaces() if _owner_gone(name))
    for name in removed:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=SETUP_TIMEOUT_S)
    for stats in glob.glob(os.path.join(tempfile.gettempdir(), f"{PREFIX}*-*.json")):  # a dead router's counts
        if _owner_gone(os.path.basename(stats)):
            with contextlib.suppress(OSError):
                os.unlink(stats)
    return removed


class World:
    """Emulated hosts (network namespaces) joined by emulated links; a context manager."""

    def __init__(self, hosts: dict[str, Profile]):
        why = available()
        if why:
            raise RuntimeError(why)
        self.hosts = dict(hosts)
        self.names = {h: f"{PREFIX}{os.getpid()}-{i}" for i, h in enumerate(self.hosts)}
        self.addresses = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(self.hosts)}
        self.router: subprocess.Popen | None = None
        self._made: list[str] = []
        self._stats: str | None = None  # the router's traffic counts

    def __enter__(self) -> "World":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        remove_leftovers()
        fds, table = [], []
        try:
            for host, profile in self.hosts.items():
                ns, address = self.names[host], self.addresses[host]
                _ip("netns", "add", ns)
                self._made.append(ns)
                fd = _open_tun(f"{DEVICE}{len(fds)}")
                fds.append(fd)
                _ip("link", "set", f"{DEVICE}{len(fds) - 1}", "netns", ns, "name", DEVICE)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{address}/16", "dev", DEVICE)
                _ip("-n", ns, "link", "set", DEVICE, "mtu", str(MTU), "up")
                table.append({"fd": fd, "address": address, "mbit": profile.mbit, "latency_ms": profile.latency_ms})
            with tempfile.NamedTemporaryFile(prefix=f"{PREFIX}{os.getpid()}-", suffix=".json", delete=False) as f:
                self._stats = f.name
            self.router = subprocess.Popen([sys.executable, __file__, "route", json.dumps(table), self._stats],
                                           pass_fds=fds,
                                           stdout=subprocess.PIPE, text=True)
            if self.router.stdout.readline().strip() != "routing":
                raise RuntimeError("the link router did not start")
        finally:
            for fd in fds:  # the router holds them now (or nothing does)
                os.close(fd)

    def address(self, host: str) -> str:
        return self.addresses[host]

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.names[host], *argv]

    def run(self, host: str, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def measure(self, sender: str, receiver: str, megabytes: float = 8.0) -> dict:
        """Round-trip time (median of small messages) and bulk throughput (the steady second half of a transfer of
        ``megabytes``) from ``sender`` to ``receiver``, through the emulated links."""
        server = self.run(receiver, [sys.executable, __file__, "sink", self.address(receiver)],
                          stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            if not port.isdigit():
                raise RuntimeError(f"the measuring sink in {receiver} did not start")
            out = subprocess.run(self.command(sender, [sys.executable, __file__, "probe", self.address(receiver),
                                                       port, str(megabytes)]),
                                 capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"measuring {sender} -> {receiver} failed: {out.stderr[-2000:]}")
            return json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            server.kill()
            server.wait(10)

    def traffic(self) -> dict[str, dict[str, int]]:
        """Bytes (IP packets, headers included) each host has sent and received through its link so far, as the
        router last wrote them (every ``STATS_PERIOD_S``); dropped packets count as sent, not received."""
        deadline = time.monotonic() + 5
        while True:
            try:
                counts = json.loads(open(self._stats).read())
                return {host: {"sent": counts["sent"][i], "received": counts["received"][i]}
                        for i, host in enumerate(self.hosts)}
            except (OSError, ValueError, KeyError, IndexError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the link router wrote no traffic counts") from None
                time.sleep(0.1)

    def expected(self, sender: str, receiver: str) -> dict:
        """What :meth:`measure` should find: the round trip crosses both links twice; the bulk rate is the slower
        of the sender's uplink and the receiver's downlink."""
        a, b = self.hosts[sender], self.hosts[receiver]
        rates = [p.mbit for p in (a, b) if p.mbit]
        return {"rtt_ms": 2 * (a.latency_ms + b.latency_ms), "mbit_s": min(rates) if rates else None}

    def close(self) -> None:
        if self.router is not None and self.router.poll() is None:
            self.router.terminate()
            try:
                self.router.wait(10)
            except subprocess.TimeoutExpired:
                self.router.kill()
                self.router.wait(10)
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=SETUP_TIMEOUT_S)
        self._made = []
        if self._stats:
            with contextlib.suppress(OSError):
                os.unlink(self._stats)
            self._stats = None


# ---- the router process ----

class _Link:
    """One direction of a host's access link: a drop-tail queue drained at ``mbit``."""

    def __init__(self, mbit: float | None):
        self.bytes_per_s = mbit * 125_000 if mbit else None
        self.limit = max(QUEUE_MIN_BYTES, int(self.bytes_per_s * QUEUE_S)) if self.bytes_per_s else None
        self.free_at = 0.0  # when the packets queued so far have all left
        self.dropped = 0

    def send(self, now: float, size: int) -> float | None:
        """When a packet entering now has left the link (None: dropped, the queue is full)."""
        if self.bytes_per_s is None:
            return now
        start = max(now, self.free_at)
        if (start - now) * self.bytes_per_s + size > self.limit:
            self.dropped += 1
            return None
        self.free_at = start + size / self.bytes_per_s
        return self.free_at


class Router:
    """Forwards packets between the TUN devices of ``table`` with each host's link profile."""

    def __init__(self, table: list[dict], stats: str | None = None):
        self.stats, self.stats_at = stats, 0.0
        self.sent, self.received = [0] * len(table), [0] * len(table)
        self.fds = [h["fd"] for h in table]
        self.by_address = {bytes(int(x) for x in h["address"].split(".")): i for i, h in enumerate(table)}
        self.up = [_Link(h["mbit"]) for h in table]
        self.down = [_Link(h["mbit"]) for h in table]
        self.latency = [h["latency_ms"] / 1000 for h in table]
        self.pending: list[tuple[float, int, int, bytes]] = []  # (due, order, host, packet)
        self.order = 0

    def accept(self, src: int, packet: bytes) -> None:
        """A packet host ``src`` sent: queue it for delivery, or drop it (not IPv4, no such host, a queue full)."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return
        dst = self.by_address.get(packet[16:20])
        if dst is None:
            return
        self.sent[src] += len(packet)
        left = self.up[src].send(time.monotonic(), len(packet))
        arrived = None if left is None else self.down[dst].send(left + self.latency[src], len(packet))
        if arrived is not None:
            self.order += 1
            heapq.heappush(self.pending, (arrived + self.latency[dst], self.order, dst, packet))

    def deliver(self) -> float:
        """Write the packets that are due (and now and then the traffic counts); returns the seconds until the next
        packet is due (at most ``STATS_PERIOD_S``)."""
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            _, _, host, packet = heapq.heappop(self.pending)
            try:
                os.write(self.fds[host], packet)
                self.received[host] += len(packet)
            except OSError:  # the host's device is gone or full: the packet is lost, as on a wire
                pass
        if self.stats and now - self.stats_at >= STATS_PERIOD_S:
            self.stats_at = now
            with open(self.stats + ".tmp", "w") as f:
                json.dump({"sent": self.sent, "received": self.received}, f)
            os.replace(self.stats + ".tmp", self.stats)
        return min(STATS_PERIOD_S, max(0.0, self.pending[0][0] - now)) if self.pending else STATS_PERIOD_S

    def run(self) -> None:
        poller = select.epoll()
        owner = {}
        for i, fd in enumerate(self.fds):
            poller.register(fd, select.EPOLLIN)
            owner[fd] = i
        parent = os.getppid()
        print("routing", flush=True)
        while os.getppid() == parent:  # the harness is gone (killed): so is the world
            for fd, _ in poller.poll(self.deliver()):
                while (packet := _read(fd)) is not None:
                    self.accept(owner[fd], packet)


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, MTU + 64)
    except BlockingIOError:
        return None


# ---- the measuring ends (run inside namespaces) ----

STREAMS = 4  # parallel bulk flows of a measurement (one flow's sawtooth under-reads a link by ~10%)


class _Sink:
    """The receiving end's state: every bulk byte's arrival time, across the flows of a measurement."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, int]] = []

    def serve(self, conn) -> None:
        with conn:
            mode = conn.recv(1)
            if mode == b"R":  # round trips
                while conn.recv(1) == b"?":
                    conn.sendall(b"!")
            elif mode == b"B":  # a bulk flow
                while data := conn.recv(1 << 20):
                    with self.lock:
                        self.arrivals.append((time.perf_counter(), len(data)))
            elif mode == b"S":  # the rate of the flows so far
                conn.sendall(json.dumps({"mbit_s": self.rate()}).encode())

    def rate(self) -> float:
        """Mbit/s over the middle half of the bytes received (past slow start, before the flows trail off)."""
        with self.lock:
            arrivals, self.arrivals = sorted(self.arrivals), []
        total = sum(n for _, n in arrivals)
        seen, marks = 0, []
        for t, n in arrivals:
            seen += n
            if len(marks) < 2 and seen >= total * (1 + 2 * len(marks)) / 4:
                marks.append((t, seen))
        if len(marks) < 2 or marks[1][0] <= marks[0][0]:
            return 0.0
        return (marks[1][1] - marks[0][1]) * 8 / 1e6 / (marks[1][0] - marks[0][0])


def sink(address: str) -> None:
    """The receiving end: echoes round trips (``R``), swallows bulk flows (``B``), answers their rate (``S``).
    Prints its port."""
    import socket
    import threading

    state, server = _Sink(), socket.create_server((address, 0))
    print(server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=state.serve, args=(conn,), daemon=True).start()


def _bulk(address: str, port: int, size: int, done: list) -> None:
    import socket

    chunk = b"\0" * (1 << 16)
    with socket.create_connection((address, port), timeout=60) as conn:
        conn.sendall(b"B")
        for offset in range(0, size, len(chunk)):
            conn.sendall(chunk[: min(len(chunk), size - offset)])
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the sink closes once it has read everything
    done.append(size)


def probe(address: str, port: int, megabytes: float) -> None:
    """The sending end: round trips of one byte (TCP_NODELAY), then ``STREAMS`` bulk flows at once; prints a
    JSON line."""
    import socket
    import statistics
    import threading

    with socket.create_connection((address, port), timeout=60) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"R")
        rtts = []
        for _ in range(7):
            started = time.perf_counter()
            conn.sendall(b"?")
            conn.recv(1)
            rtts.append((time.perf_counter() - started) * 1000)
    started, done = time.perf_counter(), []
    flows = [threading.Thread(target=_bulk, args=(address, port, int(megabytes * 2**20 / STREAMS), done))
             for _ in range(STREAMS)]
    for flow in flows:
        flow.start()
    for flow in flows:
        flow.join(120)
    if len(done) != STREAMS:
        raise SystemExit(f"only {len(done)} of {STREAMS} flows finished")
    with socket.create_connection((address, port), timeout=60) as conn:
        conn.sendall(b"S")
        rate = json.loads(conn.recv(4096))["mbit_s"]
    print(json.dumps({"rtt_ms": round(statistics.median(rtts[1:]), 2), "mbit_s": round(rate, 1),
                      "seconds": round(time.perf_counter() - started, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("route")
    p.add_argument("table")
    p.add_argument("stats", nargs="?")
    sub.add_parser("sink").add_argument("address")
    p = sub.add_parser("probe")
    p.add_argument("address")
    p.add_argument("port", type=int)
    p.add_argument("megabytes", type=float)
    args = parser.parse_args()
    if args.what == "route":
        Router(json.loads(args.table), args.stats).run()
    elif args.what == "sink":
        sink(args.address)
    else:
        probe(args.address, args.port, args.megabytes)


if __name__ == "__main__":
    main()
