"""The routing policy (``peer.swarm.routing``, pure functions): weighted by advertised speed, but a peer's claim
counts for at most a few times the stage's median; bans hold per peer id and per endpoint."""

from __future__ import annotations

import collections
import random

from peer.swarm import routing
from peer.swarm.routing import Candidate, LinkStats

HONEST = [Candidate("a", "10.0.0.1:5000", 100.0), Candidate("b", "10.0.0.2:5000", 200.0)]


def shares(candidates, stats=None, draws=20_000, **kwargs) -> dict[str, float]:
    rng, stats = random.Random(0), stats or {}
    got = collections.Counter(routing.choose(candidates, stats, 0.0, rng, **kwargs).peer_id for _ in range(draws))
    return {c.peer_id: got[c.peer_id] / draws for c in candidates}


def test_traffic_follows_advertised_speed():
    got = shares(HONEST)
    assert abs(got["b"] - 2 / 3) < 0.02, got


def test_a_huge_claim_gets_a_bounded_share():
    for claim in (1e300, float("inf"), 1e6):
        liar = Candidate("liar", "10.0.0.9:5000", claim)
        got = shares([*HONEST, liar])
        # at most PRIOR_CAP x the stage's (lower) median, 200: 800 / (100 + 200 + 800); before, all of it
        assert got["liar"] < 800 / 1100 + 0.02, (claim, got)
        alone = shares([HONEST[0], liar])
        assert alone["liar"] < 400 / 500 + 0.02, (claim, alone)


def test_a_ban_follows_the_endpoint_to_a_new_peer_id():
    stats, endpoints = {}, {}
    routing.record_failure(stats.setdefault("a", LinkStats()), now=0.0)
    routing.record_failure(endpoints.setdefault("10.0.0.1:5000", LinkStats()), now=0.0)
    reborn = Candidate("a-new-key", "10.0.0.1:5000", 100.0)  # the same address under a new key
    got = shares([reborn, HONEST[1]], stats, endpoints=endpoints)
    assert got["a-new-key"] == 0.0, got
    only = routing.choose([reborn], stats, 0.0, random.Random(0), endpoints=endpoints)
    assert only == reborn  # the last peer of a stage is never banned outright
