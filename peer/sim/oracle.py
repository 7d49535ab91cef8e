"""The oracle: the throughput of the best static assignment of the peers that are there, moment by moment.

A peer on stage ``k`` sustains ``rate_pk = 1 / max(compute_pk, link_pk)`` microbatches/s (:meth:`.costs.Costs.rate`);
a stage's capacity is the sum over its peers, and the swarm runs at its smallest stage, less the time its rounds
take: ``R_k = M / (M / capacity_k + round_k)`` with ``M`` microbatches per global batch. Assigning peers to stages to
maximise ``min_k R_k`` is a partition problem; the oracle takes the fastest peer first and gives it to the stage
that has the least capacity (longest-processing-time-first, within one peer's rate of the best split when rates do
not depend on the stage). It knows every peer's true rate, pays no routing, queueing, latency or moves, and
counts a joiner from when it could have loaded a stage: an upper bound for the simulated systems, not a system.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

from peer.sim.costs import Costs
from peer.sim.world import PeerSpec


def best_assignment(peers: Sequence[PeerSpec], costs: Costs, flops: dict[str, float]) -> list[list[PeerSpec]]:
    """The peers of each stage (fastest first, each to the stage with the least capacity so far)."""
    stages = costs.stages
    heap = [(0.0, k) for k in range(stages)]
    out: list[list[PeerSpec]] = [[] for _ in range(stages)]
    for p in sorted(peers, key=lambda p: (-flops[p.device], -p.link.mbit_s, p.peer_id)):
        capacity, k = heapq.heappop(heap)
        out[k].append(p)
        heapq.heappush(heap, (capacity + costs.rate(flops[p.device], p.link, k), k))
    return out


def throughput(assignment: Sequence[Sequence[PeerSpec]], costs: Costs, flops: dict[str, float]) -> float:
    """Microbatches/s of an assignment: its slowest stage, averaging rounds included."""
    per_round = costs.batch / costs.workload.microbatch
    rates = []
    for k, members in enumerate(assignment):
        capacity = sum(costs.rate(flops[p.device], p.link, k) for p in members)
        if capacity <= 0:
            return 0.0
        rates.append(per_round / (per_round / capacity + costs.round_s(k, [p.link for p in members])))
    return min(rates)


def ready_at(spec: PeerSpec, costs: Costs) -> float:
    """When a peer could serve at the earliest: at once at the start, else after downloading the smallest stage."""
    if spec.join_s <= 0:
        return 0.0
    return spec.join_s + min(costs.download_s(k, spec.link) for k in range(costs.stages))


def timeline(specs: Sequence[PeerSpec], costs: Costs, flops: dict[str, float], duration: float,
             step_s: float) -> list[dict]:
    """The oracle's microbatches/s on a grid (``t``: start of each interval), re-assigned whenever peers change."""
    steps = max(1, math.ceil(duration / step_s))
    out, last_alive, last_rate = [], None, 0.0
    for n in range(steps):
        t = n * step_s
        middle = min(duration, t + step_s / 2)
        alive = tuple(s for s in specs if ready_at(s, costs) <= middle < s.leave_s)
        if alive != last_alive:
            last_alive, last_rate = alive, throughput(best_assignment(alive, costs, flops), costs, flops)
        out.append({"t": t, "dt": min(step_s, duration - t), "microbatches_per_s": last_rate,
                    "peers": len(alive)})
    return out
