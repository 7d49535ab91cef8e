"""A simulated stage peer and a microbatch: the state the systems (:mod:`.systems`) move around.

A peer computes one job at a time, first come first served (a forward, a backward, or the last stage's
forward + loss + backward); a job whose microbatch has been retried elsewhere meanwhile is dropped unrun. Its link is
full duplex: a transfer passes the sender's uplink and the receiver's downlink, each a first-come-first-served
queue at its own bandwidth, and ends when both have carried it; then it travels both latencies. While its stage
averages, a peer's compute waits.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from peer.sim.world import Link, PeerSpec
from peer.swarm import routing

JOINING, ONLINE, MOVING, GONE = "joining", "online", "moving", "gone"


@dataclasses.dataclass(eq=False)
class Microbatch:
    """One microbatch on its route: ``route[k]`` served stage ``k`` in the current attempt."""

    mb_id: int
    sender: "Sender"  # its trainer
    started: float
    attempt: int = 0
    retries: int = 0
    route: list = dataclasses.field(default_factory=list)
    sent_at: list = dataclasses.field(default_factory=list)  # when the hop into stage k was sent
    fwd_epoch: list = dataclasses.field(default_factory=list)  # the stage's step count when stage k's forward ran
    open: set = dataclasses.field(default_factory=set)  # stages whose hop was sent and has not come back


class Sender:
    """Anything that sends a microbatch to a stage: a trainer (into stage 0) or a peer (into the next stage). It
    keeps, per stage it sends to, the routing policy's :class:`routing.LinkStats` and a view of the stage."""

    link: Link
    key: str

    def init_sender(self, rng_seed: int) -> None:
        self.stats: dict[int, dict[str, routing.LinkStats]] = {}
        self.views: dict[int, tuple[float, list[routing.Candidate]]] = {}  # stage -> (refreshed at, candidates)
        self.up_free = 0.0  # its uplink is busy until then
        self.down_free = 0.0

    def link_stats(self, stage: int) -> dict[str, routing.LinkStats]:
        out = self.stats.get(stage)
        if out is None:
            out = self.stats[stage] = {}
        return out


class Trainer(Sender):
    """A data owner: keeps ``in_flight`` microbatches going; ``group`` is its pipeline (static pipeline only)."""

    def __init__(self, key: str, link: Link, in_flight: int, group: int | None = None):
        self.key, self.link, self.in_flight, self.group = key, link, in_flight, group
        self.init_sender(0)
        self.alive = True
        self.done_at: list[float] = []  # when each of its microbatches completed


class SimPeer(Sender):
    """One stay of one peer (a :class:`PeerSpec`)."""

    def __init__(self, spec: PeerSpec, index: int, flops: float):
        self.spec, self.key, self.link, self.flops = spec, f"{spec.peer_id}/{index}", spec.link, flops
        self.init_sender(index)
        self.state = JOINING
        self.stage = -1
        self.group: int | None = None  # static pipeline: its pipeline
        self.throughput = 0.0  # samples/s on its stage, as it announces
        self.movable = True
        self.moved_at: float | None = None
        self.move_target: int | None = None
        self.queue: deque = deque()
        self.busy = False
        self.blocked_until = 0.0
        self.epoch = 0  # optimizer steps its stage took while it served it
        self.holding: dict[int, int] = {}  # microbatch id -> attempt: forwards done here, backward still to come
        self.busy_s = 0.0
        self.candidate: routing.Candidate | None = None

    @property
    def alive(self) -> bool:
        return self.state != GONE

    def __repr__(self) -> str:
        return f"SimPeer({self.key}, stage {self.stage}, {self.state})"
