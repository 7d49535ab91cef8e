"""The stochastic-wiring policy: which peer of a stage gets the next microbatch. Pure functions.

A sender (a trainer for stage 0, a stage peer for its next stage) picks at random, with
probability proportional to a score::

    score = capacity / (1 + in_flight) / latency_factor

* ``capacity``: the peer's advertised samples/s (its live EMA when it has one), so a GPU
  twice as fast gets twice the traffic; but at most :data:`PRIOR_CAP` times the stage's
  median advertised figure (and :data:`MAX_PLAUSIBLE`), so that a record claiming 1e300
  gets a bounded share of the traffic, not all of it;
* ``in_flight``: the microbatches this sender has outstanding at that peer, so a peer that
  is slow to answer *this* sender receives less from it at once;
* ``latency_factor``: this sender's latency EMA to the peer over the median of its EMAs to
  the stage's peers (1 when unknown), so slow links are avoided; but at least
  :data:`MIN_LATENCY_FACTOR`, so that a peer answering at once (a fake that computes nothing) gets
  at most twice the traffic of an equal peer at the median latency.

So a single liar gets a bounded share of a stage's traffic (at most ``2 * PRIOR_CAP`` times a median
peer's); the trainer's checked results (:mod:`peer.swarm.checks`) are what catch it.

Only endpoints in the run's address scope are candidates (:func:`endpoint_allowed`): a record
naming ``127.0.0.1:6379`` or a host on the sender's LAN would otherwise make every sender of
a public run dial its own machine or network.

Peers that failed are banned with exponential backoff (``base * 2^(failures-1)``, capped),
per peer id and per endpoint (a peer that comes back under a new key at the same address is
still banned), except that the last live peer of a stage is never banned: a sender always
has somewhere to try. This is SWARM's "interleaved weighted round-robin" in spirit, randomised so that
many independent senders do not synchronise. The functions depend only on their
arguments and the standard library, so the simulator and the tests call them directly.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import random
import statistics
from typing import Sequence

LATENCY_ALPHA = 0.2  # weight of a new sample in the latency EMA
BAN_BASE_S = 2.0
BAN_MAX_S = 120.0
MIN_CAPACITY = 1e-3  # a peer advertising 0 samples/s still gets a little traffic (it may just have started)
PRIOR_CAP = 4.0  # an advertised figure counts for at most this many times the stage's median
MIN_LATENCY_FACTOR = 0.5  # answering faster than the stage's median link earns at most twice the traffic
MAX_PLAUSIBLE = 1e7  # samples/s: more than any stage serves on any device (dht.records.MAX_THROUGHPUT)


SCOPES = {"public": ("public",), "private": ("public", "private"), "loopback": ("public", "private", "loopback")}
"""The address classes each scope of a run lets senders dial: a public run dials only public addresses, a LAN run
(initial peers on private addresses) private ones too, a run on one machine any."""


def address_class(host: str) -> str:
    """``loopback``, ``private`` (RFC 1918, unique local, link-local, CGNAT), ``public``, or ``invalid`` (unspecified,
    multicast, reserved) for an IP address; host names count as ``public`` (``localhost`` as ``loopback``): they are
    resolved by whoever dials."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "loopback" if host.lower().rstrip(".") == "localhost" else "public"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "invalid"
    if ip.is_private or ip.is_link_local or ip in ipaddress.ip_network("100.64.0.0/10"):
        return "private"
    return "public"


def endpoint_allowed(endpoint: str, scope: str) -> bool:
    """Whether a sender in a run of ``scope`` (a key of :data:`SCOPES`) may dial ``endpoint`` (``host:port``)."""
    host = endpoint.rsplit(":", 1)[0]
    return address_class(host) in SCOPES[scope]


def widest_scope(classes) -> str:
    """The scope a run's initial peers imply: ``loopback`` if one is on loopback, else ``private`` if one is on a
    private network, else ``public``; ``loopback`` (no limit) when none could be classed (no initial peers, names
    that did not resolve): there is nothing to infer the run's reach from."""
    classes = set(classes) - {"invalid"}
    if not classes or "loopback" in classes:
        return "loopback"
    return "private" if "private" in classes else "public"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A peer of the stage as the directory sees it."""

    peer_id: str
    endpoint: str
    throughput: float  # advertised samples/s


@dataclasses.dataclass
class LinkStats:
    """What one sender knows about its link to one peer."""

    latency_ema: float | None = None
    in_flight: int = 0
    failures: int = 0  # consecutive
    banned_until: float = 0.0
    successes: int = 0


def record_success(stats: LinkStats, seconds: float) -> None:
    stats.latency_ema = seconds if stats.latency_ema is None else (
        (1 - LATENCY_ALPHA) * stats.latency_ema + LATENCY_ALPHA * seconds)
    stats.failures = 0
    stats.banned_until = 0.0
    stats.successes += 1


def record_failure(stats: LinkStats, now: float) -> float:
    """Count a failure and ban the peer for an exponentially growing time; returns the ban length."""
    stats.failures += 1
    ban = min(BAN_MAX_S, BAN_BASE_S * 2 ** (stats.failures - 1))
    stats.banned_until = now + ban
    return ban


def scores(candidates: Sequence[Candidate], stats: dict[str, LinkStats]) -> list[float]:
    """The routing weight of each candidate (see the module docstring)."""
    latencies = [s.latency_ema for c in candidates if (s := stats.get(c.peer_id)) and s.latency_ema]
    reference = statistics.median(latencies) if latencies else None
    claimed = [min(max(c.throughput, MIN_CAPACITY), MAX_PLAUSIBLE) for c in candidates]
    bound = PRIOR_CAP * statistics.median_low(claimed) if claimed else MAX_PLAUSIBLE  # low: 2 peers, one a liar
    out = []
    for c, capacity in zip(candidates, claimed, strict=True):
        s = stats.get(c.peer_id) or LinkStats()
        factor = (s.latency_ema / reference) if (reference and s.latency_ema) else 1.0
        out.append(min(capacity, bound) / (1 + s.in_flight) / max(factor, MIN_LATENCY_FACTOR))
    return out


def banned_until(c: Candidate, stats: dict[str, LinkStats], endpoints: dict[str, LinkStats]) -> float:
    """When the ban of this candidate ends: the later of its peer id's and its endpoint's (0: not banned)."""
    by_id, by_endpoint = stats.get(c.peer_id), endpoints.get(c.endpoint)
    return max(by_id.banned_until if by_id else 0.0, by_endpoint.banned_until if by_endpoint else 0.0)


def choose(candidates: Sequence[Candidate], stats: dict[str, LinkStats], now: float, rng: random.Random,
           exclude: frozenset[str] | set[str] = frozenset(),
           endpoints: dict[str, LinkStats] | None = None,
           avoid: frozenset[str] | set[str] = frozenset(),
           distrusted: frozenset[str] | set[str] = frozenset()) -> Candidate | None:
    """One candidate at random by score, skipping ``exclude`` (peer ids or endpoints) and banned peers (by peer id,
    or by endpoint in ``endpoints``); ``distrusted`` and then ``avoid`` (peer ids or endpoints) only when no other
    is left.

    When every remaining candidate is banned, the one whose ban ends first is returned: the last
    live peers of a stage are never banned outright.
    """
    endpoints = endpoints or {}
    left = [c for c in candidates if c.peer_id not in exclude and c.endpoint not in exclude]
    if not left:
        return None
    for unwanted in (distrusted, avoid):
        left = [c for c in left if c.peer_id not in unwanted and c.endpoint not in unwanted] or left
    allowed = [c for c in left if banned_until(c, stats, endpoints) <= now]
    if not allowed:
        return min(left, key=lambda c: banned_until(c, stats, endpoints))
    weights = scores(allowed, stats)
    total = sum(weights)
    if not math.isfinite(total) or total <= 0:
        return rng.choice(allowed)
    return rng.choices(allowed, weights=weights, k=1)[0]
