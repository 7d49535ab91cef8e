"""The simulated systems: SWARM (with and without rebalancing) and static pipelines, on the same peers.

**SWARM.** Trainers keep ``in_flight`` microbatches each going. Whoever holds a microbatch's activations (a trainer
for stage 0, the peer that ran stage ``k - 1``) picks the next peer with :func:`peer.swarm.routing.choose`, over its
view of the stage, with its own :class:`routing.LinkStats` (``record_success`` with the hop's round trip,
``record_failure`` and its ban when a peer is gone). A view is a random sample of up to ``view_size`` ONLINE peers of
the stage, drawn again every ``update_period`` (a record's refresh): the policy's cost is linear in its candidates.
A hop to a peer that left fails ``detect_s`` later (``--attempt-timeout``) and is retried on another peer of the stage
by whoever holds the input; if that one left too, its own sender retries, up to the trainer. Joiners take the stage
with the least capacity (:func:`rebalancing.bottleneck`), download its state, then serve. With rebalancing, once per
``rebalance_period`` the policy's :func:`rebalancing.choose_mover` picks at most one mover on everyone's common view,
which acts after :func:`rebalancing.decide` confirms it on the view a random delay later (as
``peer.stage.rebalancer`` does): it stops taking work, finishes what it holds, downloads the new stage, serves there.

**Static pipeline.** ``peers // stages`` pipelines of one fixed peer per stage (in the order peers arrive; spares wait),
each with its own trainer; a member that leaves stalls its pipeline until a spare or the next peer to join has loaded
the stage. Routing is the same code with a single candidate.

Both average each stage after its peers together processed a global batch (:meth:`.costs.Costs.round_s`), all of
the stage's ONLINE peers at once, their compute waiting meanwhile.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

from peer.limits import ATTEMPT_TIMEOUT_S
from peer.sim.costs import Costs
from peer.sim.dataplane import DataPlane
from peer.sim.engine import Engine
from peer.sim.peers import GONE, JOINING, MOVING, ONLINE, Microbatch, SimPeer, Trainer
from peer.sim.world import Link, PeerSpec
from peer.swarm import rebalancing, routing

SWARM, NO_REBALANCING, PIPELINE = "swarm", "swarm-no-rebalancing", "pipeline"
SYSTEMS = (SWARM, NO_REBALANCING, PIPELINE)
TRAINER_LINK = Link(1000, 5)  # data owners sit in a datacenter
CONFIRM_JITTER = 0.25  # as peer.stage.rebalancer.JITTER: the confirmation comes up to a quarter period later


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """How the systems run (the rest is the world and the workload)."""

    stages: int
    seed: int = 0
    in_flight: int = 8  # microbatches per trainer
    inflight_per_peer: float = 4.0  # trainers: enough to keep this many microbatches per initial peer going
    view_size: int = 8
    update_period: float = 15.0
    detect_s: float = ATTEMPT_TIMEOUT_S
    policy: rebalancing.Policy = rebalancing.Policy()
    rebalance_period: float = 60.0
    initial: str | tuple[int, ...] = "weakest"  # the first peers' stages: "weakest" (each joins the weakest stage,
    # one after another), "random" (all at once, on the same empty view), or a stage per peer (a crowded start)
    max_attempts: int = 64  # a microbatch retried more often than this is counted lost
    announce: str = "compute"  # what a peer announces: "compute" (samples/s while computing, as LiveThroughput
    # measures) or "link-aware" (the slower of its compute and its link: a what-if for the routing policy's input)
    sample_s: float = 60.0


class System(DataPlane):
    """One system over a list of peer stays; :meth:`run` fills the counters and the timeline."""

    def __init__(self, kind: str, specs: list[PeerSpec], costs: Costs, cfg: SimConfig, flops: dict[str, float]):
        assert kind in SYSTEMS, kind
        self.kind, self.specs, self.costs, self.cfg, self.flops = kind, specs, costs, cfg, flops
        self.engine = Engine()
        self.rng = random.Random(cfg.seed)
        self.S = cfg.stages
        self.online: list[list[SimPeer]] = [[] for _ in range(self.S)]
        self.members: dict[str, SimPeer] = {}  # every peer that is there (joining, online, moving)
        self.all_peers: dict[str, SimPeer] = {}  # and those that left (still in some views)
        self.waiting: dict[object, list] = defaultdict(list)  # (group, stage) -> hops waiting for a peer
        self.stage_samples = [0] * self.S
        self.stage_busy = [0.0] * self.S
        self.vacancies: list[tuple[int, int]] = []  # pipeline: (group, stage) without a peer
        self.slots: dict[tuple[int, int], SimPeer] = {}
        self.spares: list[SimPeer] = []
        self.counters = dict(started=0, completed=0, retried=0, lost=0, rounds=0, averaging_s=0.0, moves=0,
                             recomputed=0, tokens=0)
        self.moves: list[dict] = []
        self.timeline: list[dict] = []
        self.in_flight: dict[int, Microbatch] = {}
        self._ids = 0
        self._period = 0

    # ---- setup -------------------------------------------------------------------------------------------------

    def run(self, duration: float) -> "System":
        self.duration = duration
        initial = [s for s in self.specs if s.join_s <= 0]
        if self.kind == PIPELINE:
            groups = len(initial) // self.S
            self.vacancies = [(g, k) for g in range(groups) for k in range(self.S)]
            depth = max(1, round(self.cfg.inflight_per_peer * self.S))  # as many per peer as the swarm's trainers
            trainers = [Trainer(f"t{g}", TRAINER_LINK, depth, group=g) for g in range(groups)]
        else:
            count = max(1, round(self.cfg.inflight_per_peer * len(initial) / self.cfg.in_flight))
            trainers = [Trainer(f"t{n}", TRAINER_LINK, self.cfg.in_flight) for n in range(count)]
        self.trainers = trainers
        for index, spec in enumerate(self.specs):
            self.engine.at(spec.join_s, self.arrive, spec, index)
        for trainer in trainers:
            for _ in range(trainer.in_flight):
                self.engine.at(0.0, self.launch, trainer)
        if self.kind == SWARM and self.cfg.policy.threshold > 0:
            self.engine.at(self.cfg.rebalance_period, self.rebalance_tick)
        self.engine.at(0.0, self.sample)
        self.engine.run(duration)
        self.sample()
        self.counters["in_flight_at_end"] = len(self.in_flight)
        return self

    def sample(self) -> None:
        now = self.engine.now
        if self.timeline and now - self.timeline[-1]["t"] < 1e-9:
            return
        self.timeline.append({"t": now, "tokens": self.counters["tokens"], "busy_s": list(self.stage_busy),
                              "peers": [len(s) for s in self.online], "moves": self.counters["moves"]})
        if now + self.cfg.sample_s <= self.duration:
            self.engine.after(self.cfg.sample_s, self.sample)

    # ---- peers come, move and go -------------------------------------------------------------------------------

    def arrive(self, spec: PeerSpec, index: int) -> None:
        peer = SimPeer(spec, index, self.flops[spec.device])
        self.members[peer.key] = self.all_peers[peer.key] = peer
        if spec.leave_s < float("inf"):
            self.engine.at(spec.leave_s, self.leave, peer)
        initial = spec.join_s <= 0  # the run starts from the seed's weights: nothing to download
        if self.kind == PIPELINE:
            self._fill_vacancy(peer, initial)
            return
        if initial and isinstance(self.cfg.initial, tuple):
            stage = self.cfg.initial[index % len(self.cfg.initial)]
        elif initial and self.cfg.initial == "random":
            stage = self.rng.randrange(self.S)
        else:
            stage = rebalancing.bottleneck(rebalancing.capacities(self.policy_views(), self.S))
        self._join(peer, stage, initial)

    def _join(self, peer: SimPeer, stage: int, initial: bool) -> None:
        peer.stage, peer.state = stage, JOINING
        peer.throughput = self.announced(peer, stage)
        peer.candidate = routing.Candidate(peer.key, peer.key, peer.throughput)
        if initial:  # online before the trainers' first microbatches, which are scheduled after every arrival
            self.go_online(peer)
        else:
            self.engine.after(self.costs.download_s(stage, peer.link), self.go_online, peer)

    def _fill_vacancy(self, peer: SimPeer, initial: bool) -> None:
        if not self.vacancies:
            self.spares.append(peer)
            return
        group, stage = self.vacancies.pop(0)
        peer.group = group
        self.slots[(group, stage)] = peer
        self._join(peer, stage, initial)

    def go_online(self, peer: SimPeer) -> None:
        if peer.state == GONE:
            return
        peer.state = ONLINE
        peer.epoch = 0
        self.online[peer.stage].append(peer)
        key = (peer.group, peer.stage)
        waiting, self.waiting[key] = self.waiting[key], []
        for mb, attempt, stage, sender in waiting:
            if mb.attempt == attempt and sender.alive:
                self.hop(mb, stage, sender)

    def leave(self, peer: SimPeer) -> None:
        if peer.state == GONE:
            return
        if peer.state == ONLINE:
            self.online[peer.stage].remove(peer)
        peer.state = GONE
        self.members.pop(peer.key, None)
        for mb_id, attempt in list(peer.holding.items()):
            mb = self.in_flight.get(mb_id)
            if mb is not None and mb.attempt == attempt:
                sender = mb.route[peer.stage - 1] if peer.stage > 0 else mb.sender
                self.engine.after(self.cfg.detect_s, self.hop_failed, mb, attempt, peer.stage, peer, sender)
        peer.holding.clear()
        if self.kind == PIPELINE and peer.group is not None:
            self.slots.pop((peer.group, peer.stage), None)
            self.vacancies.append((peer.group, peer.stage))
            if self.spares:
                self._fill_vacancy(self.spares.pop(0), initial=False)
        elif peer in self.spares:
            self.spares.remove(peer)

    # ---- rebalancing (the project's policy) --------------------------------------------------------------------

    def policy_views(self) -> list[rebalancing.PeerView]:
        """Every peer as the policy sees its record (a mover in its new stage, at its estimate there)."""
        out = []
        for p in self.members.values():
            stage = p.move_target if p.state == MOVING else p.stage
            if stage < 0:
                continue
            throughput = self.announced(p, stage)
            out.append(rebalancing.PeerView(p.key, stage, throughput, movable=p.movable, moved_at=p.moved_at))
        return out

    def announced(self, peer: SimPeer, stage: int) -> float:
        """The samples/s ``peer`` announces for ``stage`` (see :attr:`SimConfig.announce`)."""
        if self.cfg.announce == "link-aware":
            return self.costs.workload.microbatch * self.costs.rate(peer.flops, peer.link, stage)
        return self.costs.samples_per_s(peer.flops, stage)

    def rebalance_tick(self) -> None:
        now = self.engine.now
        self._period = int(now // self.cfg.rebalance_period)
        move = rebalancing.choose_mover(self.policy_views(), self.costs.policy_costs, self.cfg.policy, now,
                                        self._period)
        if move is not None:
            delay = self.rng.uniform(0, CONFIRM_JITTER * self.cfg.rebalance_period)
            self.engine.after(delay, self.confirm_move, move.peer_id)
        self.engine.after(self.cfg.rebalance_period, self.rebalance_tick)

    def confirm_move(self, key: str) -> None:
        peer = self.members.get(key)
        if peer is None or peer.state != ONLINE:
            return
        move = rebalancing.decide(self.policy_views(), key, self.costs.policy_costs, self.cfg.policy,
                                  self.engine.now, self._period)
        if move is None:
            return
        self.online[peer.stage].remove(peer)
        peer.state, peer.move_target, peer.moved_at = MOVING, move.target, self.engine.now
        self.counters["moves"] += 1
        self.moves.append({"t": self.engine.now, "peer": key, "from": move.source, "to": move.target})
        self._maybe_move_on(peer)

    def _maybe_move_on(self, peer: SimPeer) -> None:
        """A mover that holds nothing any more downloads its new stage."""
        if peer.state == MOVING and not peer.holding and not peer.busy:
            peer.state = JOINING
            peer.stage, peer.move_target = peer.move_target, None
            self._join(peer, peer.stage, initial=False)
