"""When a ``--stage auto`` peer looks at the swarm, and what it sees: the rebalancing policy
(:mod:`peer.swarm.rebalancing`) applied to the live DHT records, once per jittered period,
confirmed on fresh records after a random delay before the peer acts.
"""

from __future__ import annotations

import logging
import random
import time

from dht.records import PeerState
from peer.config import RunConfig
from peer.swarm.rebalancing import Move, PeerView, Policy, decide

logger = logging.getLogger(__name__)
JITTER = 0.25  # a period is drawn from [1 - JITTER, 1 + JITTER] x --rebalance-period; so is the confirmation delay


def views(directory, num_stages: int) -> list[PeerView]:
    """The peers of every stage as the policy sees them (the live EMA when a peer has one). JOINING peers count
    too, at the figure they announce: a peer moving in announces its estimate for the new stage at once, so
    that the others do not also move there while it downloads the stage's state."""
    out = []
    for stage in range(num_stages):
        for p in directory.peers(stage):
            r = p.record
            if r.state in (PeerState.ONLINE, PeerState.JOINING) and r.stage == stage:
                out.append(PeerView(p.peer_id, stage, r.throughput_ema or r.throughput, movable=r.auto_stage,
                                    moved_at=r.moved_at))
    return out


class Rebalancer:
    """The schedule and the decision of one peer (``me``); ``costs`` are the stages' compute costs.

    :param clock: DHT time (``moved_at`` in the records is DHT time)
    """

    def __init__(self, cfg: RunConfig, me: str, costs: list[float], clock=time.time, seed: int | None = None):
        p = cfg.peer
        self.me, self.costs, self.clock = me, costs, clock
        self.policy = Policy(p.rebalance_threshold, p.min_stage_peers, p.rebalance_cooldown)
        self.period = p.rebalance_period
        self.enabled = p.stage == "auto" and p.rebalance_threshold > 0 and len(costs) > 1
        self.rng = random.Random(seed)
        self.checks = 0
        self.restart()

    def _jittered(self) -> float:
        return self.period * self.rng.uniform(1 - JITTER, 1 + JITTER)

    def restart(self) -> None:
        """A full (jittered) period from now until the next check: called when the peer goes ONLINE in a stage,
        so it serves (and measures itself there) for a period before it considers moving again."""
        self._next = time.monotonic() + self._jittered()

    def due(self) -> bool:
        """Time for a check (then the next one is scheduled)."""
        if not self.enabled or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self._jittered()
        self.checks += 1
        return True

    def propose(self, directory) -> Move | None:
        """This peer's move on the directory's current view, or None."""
        now = self.clock()
        peers = views(directory, len(self.costs))
        if not any(p.peer_id == self.me for p in peers):
            return None  # our own record is not visible yet: no view to decide on
        return decide(peers, self.me, self.costs, self.policy, now, period=int(now // self.period))

    def confirm(self, directory, stop) -> Move | None:
        """After a random delay (so peers that decided on the same stale view do not act at once), read the
        records again and decide again: the move, or None. ``stop`` (a StopFlag) cuts the delay short."""
        if stop.wait(self.rng.uniform(0, JITTER * self.period)):
            return None
        directory.refresh()
        return self.propose(directory)
