"""The rebalancing policy as a pure function, on hand-built swarms and on a simulated one of 64 peers."""

from __future__ import annotations

import random

import pytest

from peer.partition import stage_costs
from peer.swarm.rebalancing import PeerView, Policy, apply, candidate_move, capacities, choose_mover, decide

EQUAL = (1.0, 1.0)
NOW = 1000.0


def auto(peer_id: str, stage: int, throughput: float, moved_at: float | None = None) -> PeerView:
    return PeerView(peer_id, stage, throughput, movable=True, moved_at=moved_at)


def pinned(peer_id: str, stage: int, throughput: float) -> PeerView:
    return PeerView(peer_id, stage, throughput, movable=False)


def test_one_peer_of_a_crowded_stage_moves_to_the_bottleneck():
    swarm = [auto("a", 0, 10.0), auto("b", 0, 10.0), auto("c", 0, 10.0), pinned("d", 1, 5.0)]
    moves = [decide(swarm, p.peer_id, EQUAL, Policy(), NOW, period=7) for p in swarm]
    (move,) = [m for m in moves if m is not None]  # exactly one of the three: no herd
    assert (move.source, move.target) == (0, 1)
    assert move.before == (30.0, 5.0) and move.after == (20.0, 15.0) and move.gain == pytest.approx(2.0)
    assert "stage 0 -> 1" in move.describe() and "bottleneck 5.0 -> 15.0" in move.describe()
    # the tie between equal peers is broken differently in other periods: nobody is always the one to go
    movers = {choose_mover(swarm, EQUAL, Policy(), NOW, period).peer_id for period in range(20)}
    assert movers == {"a", "b", "c"}


def test_a_move_inside_the_threshold_is_not_made():
    swarm = [auto("a", 0, 10.0), auto("b", 0, 10.0), auto("c", 1, 9.0), auto("d", 1, 9.0)]
    assert choose_mover(swarm, EQUAL, Policy(), NOW, 0) is None  # [20, 18]: any move makes things worse
    swarm = [auto("a", 0, 2.5), auto("b", 0, 14.0), auto("c", 1, 10.0)]  # [16.5, 10] -> [14, 12.5]: +25%...
    assert candidate_move(swarm, swarm[0], EQUAL, Policy(threshold=0.3), NOW) is None  # ...not 30%
    move = candidate_move(swarm, swarm[0], EQUAL, Policy(threshold=0.25), NOW)
    assert move is not None and move.gain == pytest.approx(0.25)
    assert candidate_move(swarm, swarm[1], EQUAL, Policy(), NOW) is None  # b would leave stage 0 the bottleneck
    assert choose_mover(swarm, EQUAL, Policy(threshold=0.0), NOW, 0) is None  # 0 disables rebalancing


def test_a_stage_is_never_emptied_nor_taken_below_its_floor():
    lonely = [auto("a", 0, 100.0), pinned("b", 1, 1.0)]
    assert choose_mover(lonely, EQUAL, Policy(), NOW, 0) is None
    pair = [auto("a", 0, 100.0), auto("b", 0, 100.0), pinned("c", 1, 1.0)]
    assert choose_mover(pair, EQUAL, Policy(), NOW, 0) is not None
    assert choose_mover(pair, EQUAL, Policy(min_stage_peers=2), NOW, 0) is None


def test_pinned_peers_and_peers_in_their_cooldown_stay():
    swarm = [pinned("a", 0, 10.0), pinned("b", 0, 10.0), pinned("c", 1, 1.0)]
    assert choose_mover(swarm, EQUAL, Policy(), NOW, 0) is None
    recent = [auto("a", 0, 10.0, moved_at=NOW - 10), auto("b", 0, 10.0, moved_at=NOW - 10), pinned("c", 1, 1.0)]
    assert choose_mover(recent, EQUAL, Policy(cooldown_s=60), NOW, 0) is None
    assert choose_mover(recent, EQUAL, Policy(cooldown_s=5), NOW, 0) is not None


def test_the_estimate_in_the_new_stage_follows_the_stages_costs():
    swarm = [auto("a", 0, 10.0), auto("b", 0, 10.0), pinned("c", 1, 2.0)]
    move = candidate_move(swarm, swarm[0], (1.0, 2.0), Policy(), NOW)  # stage 1 costs twice as much per sample
    assert move.after == (10.0, 7.0)
    costs = stage_costs("llama-14m", 8192, 128, 2)
    assert costs[1] > costs[0] > 0  # the last stage carries the LM head


def simulate(peers: list[PeerView], costs, policy: Policy, rounds: int):
    """Each round every peer decides on the view of one round ago, and acts only if the decision holds on the
    current records too (as the real peers check again before moving). Every peer computes the same mover
    from the same view, so the round asks choose_mover() once per view instead of once per peer.
    Returns the peers and the moves."""
    stale, moves = list(peers), []
    for r in range(rounds):
        fresh = list(peers)
        proposed = choose_mover(stale, costs, policy, now=r, period=r)
        if proposed is not None:  # that peer checks again on the current records
            move = decide(peers, proposed.peer_id, costs, policy, now=r, period=r)
            if move is not None:
                peers = apply(peers, move, now=r)
                moves.append((r, move))
        stale = fresh
    return peers, moves


def test_a_simulated_swarm_converges_near_the_best_assignment_and_stays():
    rng = random.Random(0)
    costs = (1.0, 1.0, 1.0, 1.5)
    speeds = [rng.lognormvariate(0.0, 0.5) * 100 for _ in range(64)]  # samples/s on a stage of cost 1
    start = [0] * 40 + [1] * 8 + [2] * 8 + [3] * 8  # most volunteers picked the first stage
    peers = [auto(f"p{i:02d}", k, speeds[i] / costs[k]) for i, k in enumerate(start)]
    best = sum(speeds) / sum(costs)  # no assignment's bottleneck can exceed this (fractional bound)
    before = min(capacities(peers, 4))

    peers, moves = simulate(peers, costs, Policy(threshold=0.02, cooldown_s=5), 100)

    after = min(capacities(peers, 4))
    assert after >= 0.9 * best, (before, after, best)
    last = max(r for r, _ in moves)
    assert last < 70, f"still moving in round {last}: {len(moves)} moves"  # converged, then 30 rounds quiet
    back = [(r, m) for r, m in moves if any(r0 < r and m0.peer_id == m.peer_id and m0.source == m.target
                                            for r0, m0 in moves)]
    assert not back, f"flip-flop: {back[:3]}"
    assert all(sum(1 for p in peers if p.stage == k) >= 1 for k in range(4))


def test_the_view_counts_online_and_joining_peers_with_their_live_figures():
    from dht.announce import new_peer_record
    from dht.peers import LivePeer
    from dht.records import PeerState
    from peer.stage.rebalancer import views

    def live(peer_id, stage, state, **fields):
        record = new_peer_record(stage, "0.1.0", state=state, endpoint="127.0.0.1:1", **fields)
        return LivePeer(peer_id=peer_id, subkey=b"k", record=record, expires_at=record.updated_at + 60)

    class Directory:  # what peer.swarm.directory.Directory.peers() returns, without a DHT
        by_stage = {0: [live("a", 0, PeerState.ONLINE, throughput=10.0, throughput_ema=7.5, auto_stage=True),
                        live("b", 0, PeerState.DRAINING, throughput=10.0)],
                    1: [live("c", 1, PeerState.JOINING, throughput=4.0, moves=1, moved_at=5.0),
                        live("d", 0, PeerState.ONLINE, throughput=9.0)]}  # a stale record under the wrong key

        def peers(self, stage):
            return self.by_stage[stage]

    seen = views(Directory(), 2)
    assert seen == [PeerView("a", 0, 7.5, movable=True), PeerView("c", 1, 4.0, moved_at=5.0)]
