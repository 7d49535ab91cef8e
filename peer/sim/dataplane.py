"""A microbatch's way through the simulated stages: hops (routed by :func:`peer.swarm.routing.choose`), compute jobs,
gradients back, failures and retries, and the stages' averaging rounds. A mixin of :class:`peer.sim.systems.System`.

Conservation: every microbatch a trainer starts is, at the end, completed, counted lost (after ``max_attempts``
attempts), or still in flight; every failed hop is counted as a retry.
"""

from __future__ import annotations

from peer.sim.costs import FORWARD_SHARE
from peer.sim.peers import GONE, ONLINE, Microbatch, Sender, SimPeer, Trainer
from peer.swarm import routing

FORWARD, BACKWARD, BOTH = "f", "b", "fb"  # the last stage runs forward, loss and backward as one job


class DataPlane:
    """Uses ``engine``, ``rng``, ``costs``, ``cfg``, ``S``, ``online``, ``slots``, ``waiting``, ``counters``,
    ``in_flight``, ``all_peers``, ``stage_samples``, ``stage_busy``, ``kind`` and ``_maybe_move_on`` of the class
    it is mixed into."""

    # ---- trainers ----------------------------------------------------------------------------------------------

    def launch(self, trainer: Trainer) -> None:
        self._ids += 1
        mb = Microbatch(self._ids, trainer, self.engine.now)
        self.in_flight[mb.mb_id] = mb
        self.counters["started"] += 1
        self.hop(mb, 0, trainer)

    def complete(self, mb: Microbatch) -> None:
        del self.in_flight[mb.mb_id]
        self.counters["completed"] += 1
        self.counters["tokens"] += self.costs.workload.tokens_per_microbatch
        mb.sender.done_at.append(self.engine.now)
        self.launch(mb.sender)

    # ---- hops --------------------------------------------------------------------------------------------------

    def view(self, sender: Sender, stage: int) -> list[routing.Candidate]:
        """The stage as ``sender`` sees it: its pipeline's peer, or a sample of the stage redrawn every period."""
        if self.kind == "pipeline":
            peer = self.slots.get((sender.group, stage))
            return [peer.candidate] if peer is not None and peer.state == ONLINE else []
        now = self.engine.now
        seen = sender.views.get(stage)
        if seen is None or now - seen[0] >= self.cfg.update_period or not seen[1]:
            peers = self.online[stage]
            chosen = peers if len(peers) <= self.cfg.view_size else self.rng.sample(peers, self.cfg.view_size)
            seen = sender.views[stage] = (now, [p.candidate for p in chosen])
        return seen[1]

    def hop(self, mb: Microbatch, stage: int, sender: Sender) -> None:
        """``sender`` sends ``mb`` into ``stage``: routing picks the peer, the links carry the activations."""
        chosen = routing.choose(self.view(sender, stage), sender.link_stats(stage), self.engine.now, self.rng)
        if chosen is None:  # nobody serves the stage (for this sender): wait for a peer to come online
            self.waiting[(getattr(sender, "group", None) if self.kind == "pipeline" else None, stage)].append(
                (mb, mb.attempt, stage, sender))
            return
        peer = self.all_peers[chosen.peer_id]
        stats = sender.link_stats(stage)
        link = stats.get(peer.key)
        if link is None:
            link = stats[peer.key] = routing.LinkStats()
        link.in_flight += 1
        del mb.route[stage:], mb.sent_at[stage:], mb.fwd_epoch[stage:]
        mb.route.append(peer)
        mb.sent_at.append(self.engine.now)
        mb.fwd_epoch.append(0)
        mb.open.add(stage)
        arrival = self.send(sender, peer, self.costs.bytes_in[stage])
        self.engine.at(arrival, self.arrive_forward, mb, mb.attempt, stage, peer, sender)

    def send(self, a: Sender, b: Sender, nbytes: float) -> float:
        """When ``nbytes`` from ``a`` arrive at ``b``: ``a``'s uplink and ``b``'s downlink each carry the bytes after
        what they already carry (first come, first served, each at its own bandwidth), the transfer ends when both
        have (so the slower one sets its pace), and then travels both latencies."""
        now = self.engine.now
        a.up_free = max(now, a.up_free) + nbytes / a.link.bytes_per_s
        b.down_free = max(now, b.down_free) + nbytes / b.link.bytes_per_s
        return max(a.up_free, b.down_free) + a.link.latency_s + b.link.latency_s

    def arrive_forward(self, mb: Microbatch, attempt: int, stage: int, peer: SimPeer, sender: Sender) -> None:
        if mb.attempt != attempt:
            return
        if peer.state != ONLINE:  # gone: noticed after the attempt timeout; draining: refused at once
            delay = self.cfg.detect_s if peer.state == GONE else 2 * (peer.link.latency_s + sender.link.latency_s)
            self.engine.after(delay, self.hop_failed, mb, attempt, stage, peer, sender)
            return
        peer.holding[mb.mb_id] = attempt
        self.enqueue(peer, (BOTH if stage == self.S - 1 else FORWARD, mb, attempt, stage))

    def arrive_backward(self, mb: Microbatch, attempt: int, stage: int, peer: SimPeer, target: Sender) -> None:
        """The gradient of ``stage``'s input reaches the one that sent the microbatch into it."""
        if mb.attempt != attempt or not target.alive:
            return
        mb.open.discard(stage)
        link = target.link_stats(stage).get(peer.key)
        if link is not None:
            link.in_flight = max(0, link.in_flight - 1)
            routing.record_success(link, self.engine.now - mb.sent_at[stage])
        if stage == 0:
            self.complete(mb)
        else:
            self.enqueue(target, (BACKWARD, mb, attempt, stage - 1))

    # ---- compute -----------------------------------------------------------------------------------------------

    def enqueue(self, peer: SimPeer, job: tuple) -> None:
        peer.queue.append(job)
        if not peer.busy:
            self.start_next(peer)

    def start_next(self, peer: SimPeer) -> None:
        now = self.engine.now
        while peer.queue:
            if now < peer.blocked_until:  # its stage is averaging
                self.engine.at(peer.blocked_until, self.start_next, peer)
                peer.busy = True  # the resume event restarts it
                return
            kind, mb, attempt, stage = peer.queue.popleft()
            if mb.attempt != attempt or peer.state == GONE:
                continue
            full = self.costs.compute_s(peer.flops, stage)
            seconds = {FORWARD: FORWARD_SHARE, BACKWARD: 1 - FORWARD_SHARE, BOTH: 1.0}[kind] * full
            if kind == BACKWARD and mb.fwd_epoch[stage] < peer.epoch:  # a step came between: recompute the forward
                seconds += FORWARD_SHARE * full
                self.counters["recomputed"] += 1
            peer.busy = True
            peer.busy_s += seconds
            self.stage_busy[stage] += seconds
            self.engine.after(seconds, self.job_done, peer, kind, mb, attempt, stage)
            return
        peer.busy = False
        self._maybe_move_on(peer)

    def job_done(self, peer: SimPeer, kind: str, mb: Microbatch, attempt: int, stage: int) -> None:
        peer.busy = False
        if peer.state == GONE:
            return
        if mb.attempt == attempt:
            if kind != BACKWARD:
                mb.fwd_epoch[stage] = peer.epoch
            if kind == FORWARD:
                self.hop(mb, stage + 1, peer)
            else:
                self.backward_done(mb, stage, peer)
        self.start_next(peer)

    def backward_done(self, mb: Microbatch, stage: int, peer: SimPeer) -> None:
        peer.holding.pop(mb.mb_id, None)
        target = mb.route[stage - 1] if stage > 0 else mb.sender
        arrival = self.send(peer, target, self.costs.bytes_back[stage])
        self.engine.at(arrival, self.arrive_backward, mb, mb.attempt, stage, peer, target)
        self.stage_samples[stage] += self.costs.workload.microbatch
        if self.stage_samples[stage] >= self.costs.batch:
            self.stage_samples[stage] -= self.costs.batch
            self.average(stage)

    def average(self, stage: int) -> None:
        """A global step of ``stage``: its ONLINE peers all-reduce, their compute waiting meanwhile."""
        members = self.online[stage]
        seconds = self.costs.round_s(stage, [p.link for p in members])
        self.counters["rounds"] += 1
        self.counters["averaging_s"] += seconds
        until = self.engine.now + seconds
        for p in members:
            p.epoch += 1
            p.blocked_until = max(p.blocked_until, until)

    # ---- failures ----------------------------------------------------------------------------------------------

    def hop_failed(self, mb: Microbatch, attempt: int, stage: int, peer: SimPeer, sender: Sender) -> None:
        """``sender`` finds out that ``peer`` will not return ``mb``: ban it, retry the hop on another peer."""
        if mb.attempt != attempt or not sender.alive:
            return  # already retried; or the sender left too, and its own sender retries
        mb.open.discard(stage)
        link = sender.link_stats(stage).get(peer.key)
        if link is not None:
            link.in_flight = max(0, link.in_flight - 1)
            routing.record_failure(link, self.engine.now)
        self._abandon(mb, stage)
        mb.attempt += 1
        mb.retries += 1
        self.counters["retried"] += 1
        if mb.attempt > self.cfg.max_attempts:
            self._abandon(mb, -1)
            del self.in_flight[mb.mb_id]
            self.counters["lost"] += 1
            self.launch(mb.sender)
            return
        for p in mb.route[:stage]:  # the peers upstream still hold their activations, now for this attempt
            if p.alive:
                p.holding[mb.mb_id] = mb.attempt
        self.hop(mb, stage, sender)

    def _abandon(self, mb: Microbatch, stage: int) -> None:
        """Forget ``mb``'s route below ``stage`` (all of it for -1): what those peers hold of it, and the hops their
        senders still count in flight (a cancelled call)."""
        for k in [k for k in mb.open if k > stage]:
            peer, upstream = mb.route[k], (mb.route[k - 1] if k > 0 else mb.sender)
            link = upstream.link_stats(k).get(peer.key)
            if link is not None:
                link.in_flight = max(0, link.in_flight - 1)
            mb.open.discard(k)
        for peer in mb.route[stage + 1:]:
            if peer.holding.get(mb.mb_id) == mb.attempt:
                del peer.holding[mb.mb_id]
                self._maybe_move_on(peer)
