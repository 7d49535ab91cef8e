"""The adaptive-rebalancing policy: should a ``--stage auto`` peer move to the bottleneck stage? Pure functions.

A stage's *capacity* is the sum of its ONLINE peers' samples/s; a pipeline moves no faster than
its smallest capacity, the *bottleneck*. A movable peer in stage ``s`` considers one move, to the
bottleneck stage ``b``. Its throughput there is estimated from what it does now, scaled by the two
stages' compute costs (``peer.partition.stage_costs``)::

    estimate_b = throughput_s * cost_s / cost_b

The move is worth it when the two stages it touches both end up at least ``1 + threshold`` times
the bottleneck's capacity before it::

    min(capacity_s - throughput_s, capacity_b + estimate_b) >= (1 + threshold) * capacity_b

With one bottleneck stage that is the swarm's bottleneck rising by ``threshold`` (or more, up to the
next stage); with several stages tied at the bottleneck it raises one of them, and the swarm's
bottleneck rises once each has been raised, one move per period. Every move lifts a stage at the
bottleneck and leaves no stage at or below the old level, so the sorted capacities only ever
improve: the policy cannot cycle. A move never takes a stage below ``min_stage_peers``, pinned
peers (``--stage K``) never move, nor does a peer within ``cooldown_s`` of its last move.

No herd: every peer evaluates every movable peer's move on the same view, and only the best one
(the largest gain; ties broken by a hash of the peer id and the period, so
no peer is always first) is the mover of that period: several peers of one stage that all
qualify do not all leave it at once. A peer acts only when it is that mover, and only after
checking again on fresh records (``peer.stage.peer`` does that), so it never moves on a stale view.
The functions depend only on their arguments and the standard library: the peers, the tests and
the simulator run the same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

DEFAULT_THRESHOLD = 0.2  # a move must raise the bottleneck capacity by 20%
DEFAULT_MIN_STAGE_PEERS = 1
DEFAULT_COOLDOWN_S = 300.0  # a peer moves at most once per 5 minutes


@dataclasses.dataclass(frozen=True)
class PeerView:
    """One ONLINE peer as the rebalancing policy sees it (from its DHT record)."""

    peer_id: str
    stage: int
    throughput: float  # samples/s it serves on its stage (its live EMA when it has one)
    movable: bool = False  # started with --stage auto
    moved_at: float | None = None  # when it last moved (None: never)


@dataclasses.dataclass(frozen=True)
class Policy:
    threshold: float = DEFAULT_THRESHOLD  # 0 disables rebalancing
    min_stage_peers: int = DEFAULT_MIN_STAGE_PEERS
    cooldown_s: float = DEFAULT_COOLDOWN_S


@dataclasses.dataclass(frozen=True)
class Move:
    """A move of one peer to another stage and what it does to the stages' capacities."""

    peer_id: str
    source: int
    target: int
    before: tuple[float, ...]  # capacity of each stage now
    after: tuple[float, ...]  # capacity of each stage after the move

    @property
    def gain(self) -> float:
        """How much the two stages' lower capacity rises over the bottleneck's before (``inf`` when the move
        fills an empty stage): the quantity compared with the threshold."""
        low = self.before[self.target]
        reached = min(self.after[self.source], self.after[self.target])
        return float("inf") if low <= 0 else reached / low - 1.0

    def describe(self) -> str:
        shown = lambda caps: ", ".join(f"{c:.1f}" for c in caps)  # noqa: E731
        return (f"stage {self.source} -> {self.target}: stage capacities [{shown(self.before)}] -> "
                f"[{shown(self.after)}] samples/s (bottleneck {min(self.before):.1f} -> {min(self.after):.1f})")


def capacities(peers: Sequence[PeerView], num_stages: int) -> list[float]:
    """Samples/s of each stage: the sum of its peers' throughput."""
    out = [0.0] * num_stages
    for p in peers:
        if 0 <= p.stage < num_stages:
            out[p.stage] += max(p.throughput, 0.0)
    return out


def stage_counts(peers: Sequence[PeerView], num_stages: int) -> list[int]:
    """How many peers each stage has."""
    out = [0] * num_stages
    for p in peers:
        if 0 <= p.stage < num_stages:
            out[p.stage] += 1
    return out


def bottleneck(caps: Sequence[float]) -> int:
    """The stage with the smallest capacity (the lowest index among equals)."""
    return min(range(len(caps)), key=lambda k: (caps[k], k))


def candidate_move(peers: Sequence[PeerView], peer: PeerView, costs: Sequence[float], policy: Policy,
                   now: float, before: Sequence[float] | None = None,
                   counts: Sequence[int] | None = None) -> Move | None:
    """``peer``'s move to the bottleneck if the policy allows it and it pays (see the module docstring).

    :param before: ``capacities(peers, len(costs))`` when the caller has it already
    :param counts: ``stage_counts(peers, len(costs))`` when the caller has it already (without both, evaluating
        every peer's move costs time quadratic in the peers: seconds per period at thousands of peers)
    """
    num_stages = len(costs)
    if not peer.movable or policy.threshold <= 0 or not 0 <= peer.stage < num_stages:
        return None
    if peer.moved_at is not None and now - peer.moved_at < policy.cooldown_s:
        return None
    before = list(before) if before is not None else capacities(peers, num_stages)
    target = bottleneck(before)
    if target == peer.stage:
        return None
    size = counts[peer.stage] if counts is not None else sum(1 for p in peers if p.stage == peer.stage)
    if size - 1 < max(policy.min_stage_peers, 1):
        return None  # never empty a stage, nor take it below its floor
    after = list(before)
    after[peer.stage] -= max(peer.throughput, 0.0)
    after[target] += max(peer.throughput, 0.0) * costs[peer.stage] / costs[target]
    move = Move(peer.peer_id, peer.stage, target, tuple(before), tuple(after))
    return move if move.gain >= policy.threshold else None


def _tie_break(peer_id: str, period: int) -> str:
    return hashlib.sha256(f"{period}:{peer_id}".encode()).hexdigest()


def choose_mover(peers: Sequence[PeerView], costs: Sequence[float], policy: Policy, now: float,
                 period: int) -> Move | None:
    """The one move of this period: among every peer's :func:`candidate_move`, the one with the largest
    gain (ties: a hash of peer id and ``period``, the same on every peer, so no peer is always first)."""
    before, counts = capacities(peers, len(costs)), stage_counts(peers, len(costs))
    moves = [m for p in peers if (m := candidate_move(peers, p, costs, policy, now, before, counts)) is not None]
    if not moves:
        return None
    return min(moves, key=lambda m: (-m.gain, _tie_break(m.peer_id, period)))


def decide(peers: Sequence[PeerView], me: str, costs: Sequence[float], policy: Policy, now: float,
           period: int) -> Move | None:
    """``me``'s move this period, or None when it should stay (someone else moves, or nobody should)."""
    mover = choose_mover(peers, costs, policy, now, period)
    return mover if mover is not None and mover.peer_id == me else None


def apply(peers: Sequence[PeerView], move: Move, now: float) -> list[PeerView]:
    """The peers after ``move``: the mover in its new stage, its throughput estimated as in the module
    docstring (what the simulator assumes until the peer measures it)."""
    out = []
    for p in peers:
        if p.peer_id == move.peer_id:
            gained = move.after[move.target] - move.before[move.target]
            p = dataclasses.replace(p, stage=move.target, throughput=gained, moved_at=now)
        out.append(p)
    return out
