"""Live peers of every stage, read from the DHT in the background, and the per-stage routers on top.

A :class:`Directory` refreshes ``{stage: [LivePeer]}`` every ``refresh_s`` seconds on its own
thread (hivemind calls block), so routers never wait for the DHT on the hot path. A
:class:`StageRouter` implements the data plane's ``NextHop`` for one stage with the pure
policy of :mod:`peer.swarm.routing`: it chooses among the stage's ONLINE peers, tracks its
own in-flight count and latency EMA per peer, and bans failed peers with backoff. It also tells
the data plane which TLS certificate the chosen peer's record pins (:meth:`StageRouter.pin`).
"""

from __future__ import annotations

import logging
import random
import threading
import time

from peer.swarm import routing

logger = logging.getLogger(__name__)
FAILURES_TO_WARN = 5  # refreshes failed in a row (10 s at the default period) before a warning with the traceback


class Directory:
    """The stages' live peers, refreshed in the background.

    :param read: ``() -> {stage: [LivePeer]}`` (e.g. ``lambda: routable_peers(node, num_stages)``)
    """

    def __init__(self, read, num_stages: int, refresh_s: float = 2.0):
        self.read, self.num_stages, self.refresh_s = read, num_stages, refresh_s
        self._peers: dict[int, list] = {k: [] for k in range(num_stages)}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fresh = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="swarm-directory", daemon=True)
        self.refreshed_at = 0.0
        self.failures = 0  # refreshes failed in a row

    def start(self, wait: float = 10.0) -> "Directory":
        self._thread.start()
        self._fresh.wait(wait)
        return self

    def refresh(self) -> None:
        try:
            peers = self.read()
        except Exception as e:  # a DHT hiccup: keep the last view, try again next period
            self.failures += 1
            if self.failures % FAILURES_TO_WARN:
                logger.debug("directory refresh failed: %s", e)
            else:  # not a hiccup any more: say so, with where it fails
                logger.warning("directory refresh failed %d times in a row: %s", self.failures, e, exc_info=True)
            return
        self.failures = 0
        with self._lock:
            old, self._peers = self._peers, {k: list(peers.get(k, [])) for k in range(self.num_stages)}
            self.refreshed_at = time.time()
        if self._fresh.is_set():
            _log_changes(old, self._peers)
        self._fresh.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.refresh_s)

    def peers(self, stage: int) -> list:
        with self._lock:
            return list(self._peers.get(stage, []))

    def counts(self) -> dict[int, int]:
        with self._lock:
            return {k: len(v) for k, v in self._peers.items()}

    def throughput(self, stage: int) -> float:
        return sum(p.record.throughput_ema or p.record.throughput for p in self.peers(stage))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def _log_changes(old: dict[int, list], new: dict[int, list]) -> None:
    """One line per stage whose set of peers changed since the last refresh (an event, not a period)."""
    for stage, peers in new.items():
        before, now = {p.peer_id for p in old.get(stage, [])}, {p.peer_id for p in peers}
        if before != now:
            joined, left = sorted(now - before), sorted(before - now)
            logger.info("stage %d: %d peer(s)%s%s", stage, len(now),
                        f"; new {', '.join(p[-8:] for p in joined)}" if joined else "",
                        f"; gone {', '.join(p[-8:] for p in left)}" if left else "")


class StageRouter:
    """``NextHop`` for one stage: weighted random choice among its ONLINE peers (see ``routing``)."""

    def __init__(self, directory: Directory, stage: int, seed: int | None = None, scope: str = "loopback"):
        """:param scope: the endpoints this sender may dial (``routing.SCOPES``; the default: any)"""
        self.directory, self.stage, self.scope = directory, stage, scope
        self._outside: set[str] = set()  # endpoints skipped for the scope (each logged once)
        self.rng = random.Random(seed)
        self.stats: dict[str, routing.LinkStats] = {}
        self.endpoint_stats: dict[str, routing.LinkStats] = {}  # bans follow an address across new peer ids
        self._by_endpoint: dict[str, str] = {}
        self._pins: dict[str, str | None] = {}  # endpoint -> certificate hash in the record chosen there last
        self._lock = threading.Lock()
        self.bans = 0

    def candidates(self) -> list[routing.Candidate]:
        out = []
        for p in self.directory.peers(self.stage):
            if p.routable and self._in_scope(p.record.endpoint):
                out.append(routing.Candidate(p.peer_id, p.record.endpoint, p.record.throughput_ema
                                             or p.record.throughput))
        return out

    def choose(self, exclude: set[str], avoid: frozenset[str] = frozenset(),
               distrusted: frozenset[str] = frozenset()) -> str | None:
        with self._lock:
            chosen = routing.choose(self.candidates(), self.stats, time.time(), self.rng, exclude, self.endpoint_stats,
                                    avoid, distrusted)
            if chosen is None:
                return None
            self._by_endpoint[chosen.endpoint] = chosen.peer_id
            self._pins[chosen.endpoint] = self._record_pin(chosen.peer_id)
            self.stats.setdefault(chosen.peer_id, routing.LinkStats()).in_flight += 1
            return chosen.endpoint

    def report(self, address: str, ok: bool, seconds: float, by_address: bool = True) -> None:
        with self._lock:
            peer_id = self._by_endpoint.get(address)
            if peer_id is None:
                return
            stats = self.stats.setdefault(peer_id, routing.LinkStats())
            stats.in_flight = max(0, stats.in_flight - 1)
            by_endpoint = self.endpoint_stats.setdefault(address, routing.LinkStats())
            if ok:
                routing.record_success(stats, seconds)
                routing.record_success(by_endpoint, seconds)
            else:
                ban = routing.record_failure(stats, time.time())
                if by_address:  # a record's false pin is its own failure: the address may be an honest peer's
                    routing.record_failure(by_endpoint, time.time())
                self.bans += 1
                logger.info("stage %d peer %s (%s) failed; banned for %.0f s", self.stage, peer_id, address, ban)

    def _in_scope(self, endpoint: str) -> bool:
        if routing.endpoint_allowed(endpoint, self.scope):
            return True
        if endpoint not in self._outside and len(self._outside) < 1024:
            self._outside.add(endpoint)
            logger.warning("stage %d: not dialing %s: outside this run's %s address scope (--endpoint-scope)",
                           self.stage, endpoint, self.scope)
        return False

    def _record_pin(self, peer_id: str) -> str | None:
        return next((p.record.tls_sha256 for p in self.directory.peers(self.stage) if p.peer_id == peer_id), None)

    def pin(self, address: str) -> str | None:
        """SHA-256 of the TLS certificate in the record of the peer last chosen at ``address`` (None: plaintext);
        taken at the choice, so the record that named the address also names the certificate."""
        with self._lock:
            return self._pins.get(address)

    def live_count(self) -> int:
        return len(self.candidates())
