"""``swarm-peer join``: one stage peer, from joining the run to leaving it.

1. join the DHT and take the run's config (refusing a mismatch), pick the stage (``--stage K``
   or ``auto``: the stage with the least ONLINE throughput), announce JOINING;
2. build the stage from the run's seed, then download the stage's current state from its
   peers if it has any (else: from ``--checkpoint-dir`` if it holds this stage, else the seed);
3. measure (or read the cached) throughput, start the gRPC server with a router to the
   next stage, announce ONLINE with its endpoint and throughput;
4. serve: the stage's hivemind collaboration steps every global batch; queue, in-flight,
   epoch and live samples/s go into the record every refresh;
5. with ``--stage auto``: every ``--rebalance-period`` ask the rebalancing policy whether to move
   to the bottleneck stage, and if so move inside this process (:meth:`StagePeer.move`);
6. on SIGTERM/SIGINT: announce DRAINING, finish in-flight microbatches, save a checkpoint,
   announce OFFLINE, exit 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from peer import __version__
from dht.records import PeerState
from peer.config import RunConfig
from peer.errors import ConfigError
from peer.partition import build_stage, stage_costs
from peer.priority import lower_background_priority
from peer.rpc.tls import ServerTLS, load_server_tls
from peer.stage.averaging import StageOptimizer
from peer.stage.checkpoints import restore_stage, save_stage, stage_checkpoint_dir
from peer.stage.runtime import StageRuntime, StageSpec
from peer.stage.rebalancer import Rebalancer
from peer.stage.replicas import Mate
from peer.stage.server import StageServer
from peer.stage.throughput import LiveThroughput, throughput_for
from peer.swarm.directory import Directory, StageRouter
from peer.session import Session, announce_host, endpoint_scope, run_vocab
from peer.training import StopFlag, limit_threads, resolve_device

logger = logging.getLogger("peer.join")
DRAIN_GRACE_S = 25.0  # SIGTERM -> exit stays within the documented 30 s


def pick_stage(cfg: RunConfig, directory: Directory) -> int:
    """``--stage K``; with ``auto``, ``--initial-stage`` if set, else the stage with the least ONLINE throughput
    (then fewest peers, then lowest index)."""
    stages = cfg.model.stages
    if cfg.peer.stage == "auto" and cfg.peer.initial_stage is not None:
        if cfg.peer.initial_stage >= stages:
            raise ConfigError(f"--initial-stage {cfg.peer.initial_stage}: run {cfg.swarm_run_id!r} has stages "
                              f"0..{stages - 1}")
        return cfg.peer.initial_stage
    if cfg.peer.stage != "auto":
        stage = int(cfg.peer.stage)
        if stage >= stages:
            raise ConfigError(f"--stage {stage}: run {cfg.swarm_run_id!r} has stages 0..{stages - 1}")
        return stage
    directory.refresh()
    return min(range(stages), key=lambda k: (directory.throughput(k), len(directory.peers(k)), k))


class StageParts:
    """One stage's serving parts in this process: the module, its averaging collaboration, the compute
    runtime and the gRPC server. Joining builds them; a move tears them down and builds another stage's.

    :param peer: the process-wide parts (``cfg``, ``session``, ``directory``, ``announcer``, ``device``,
        ``vocab``, ``me``)
    """

    def __init__(self, peer: "StagePeer", stage: int):
        self.peer, self.stage = peer, stage
        cfg, session, directory = peer.cfg, peer.session, peer.directory
        self.module = build_stage(cfg.model.preset, peer.vocab, cfg.data.seq_len, cfg.train.seed, stage,
                                  cfg.model.stages, cfg.model.partition).to(peer.device)

        def mates() -> list[Mate]:  # the other live peers of this stage that can share state (signed records)
            return [Mate(p.peer_id, p.subkey, p.record.dht_peer_id or "") for p in directory.peers(stage)
                    if p.peer_id != peer.me and p.record.state != PeerState.JOINING]

        def members() -> set[str]:  # who may be in a gradient round: every live record holder, JOINING too
            return {p.record.dht_peer_id for p in directory.peers(stage) if p.record.dht_peer_id}

        self.optimizer = StageOptimizer(session.node.dht, cfg.swarm_run_id, stage, self.module, cfg,
                                        key=session.node.key, me=peer.me, mates=mates, members=members)
        self.server = self.watcher = None
        self.closed = False
        try:
            self._start()
        except BaseException:  # nothing of a half-built stage outlives it (averagers, server)
            self.close()
            raise

    def _start(self) -> None:
        """Load the stage's state (peers, else checkpoint, else seed), then start computing and serving."""
        peer, stage = self.peer, self.stage
        cfg, session, directory = peer.cfg, peer.session, peer.directory
        directory.refresh()
        self.source = "peers" if self.optimizer.view.mates() and self.optimizer.load_state_from_peers() else \
            restore_stage(cfg, stage, self.optimizer, session.fingerprint)
        self.optimizer.publish_digest()
        self.optimizer.share_state()  # it holds the stage's state now: others may download it
        self.optimizer.view.refresh()  # who else averages, before the first microbatch
        lower_background_priority(cfg.net.background_nice)  # the averagers' processes are new

        self.throughput = throughput_for(cfg, stage, peer.vocab)
        spec = StageSpec(cfg.swarm_run_id, stage, cfg.model.stages, self.module.config.hidden_size, peer.vocab,
                         max_microbatch=max(64, cfg.train.microbatch_size), max_seq_len=cfg.data.seq_len,
                         fingerprint=session.fingerprint)
        drain = cfg.peer.drain_timeout if cfg.peer.drain_timeout != float("inf") else None
        self.runtime = StageRuntime(self.module, spec, peer.device, cfg.train.precision,
                                    on_backward=self.optimizer.on_backward, late_grads=self.optimizer.late,
                                    drain_timeout=drain,
                                    slowdown=cfg.train.compute_slowdown, epoch=lambda: self.optimizer.epoch)
        self.live = LiveThroughput()
        router = StageRouter(directory, stage + 1, seed=cfg.train.seed, scope=endpoint_scope(cfg)) \
            if stage + 1 < cfg.model.stages else None
        self.server = StageServer(self.runtime, router, host=cfg.peer.host, port=cfg.peer.port,
                                  announce_host=announce_host(cfg), max_in_flight=cfg.peer.max_in_flight,
                                  attempt_timeout=cfg.link.attempt_timeout, max_budget_s=cfg.link.hop_timeout,
                                  peer_name=cfg.peer.public_name or "", admission=session.admission,
                                  tls=peer.tls).start()
        self.saved_epoch = self.optimizer.epoch

    def go_online(self) -> None:
        self.watcher = asyncio.run_coroutine_threadsafe(self.optimizer.watch(self.runtime), self.server.loop)
        self.peer.announcer.update(state=PeerState.ONLINE, endpoint=self.server.address,
                                   throughput=self.throughput.samples_per_s, throughput_ema=None,
                                   step=self.optimizer.epoch)

    def tick(self) -> None:
        """Every half second while serving: the record's live fields, and a checkpoint when one is due."""
        cfg, opt = self.peer.cfg, self.optimizer
        self.peer.announcer.update(queue=self.runtime.worker.queue_size, inflight=self.server.servicer.in_flight,
                                   step=opt.epoch,
                                   throughput_ema=self.live.update(self.runtime.samples_trained,
                                                                   self.runtime.compute_s))
        every = cfg.train.checkpoint_interval
        if every and stage_checkpoint_dir(cfg, self.stage) and opt.epoch >= self.saved_epoch + every:
            self.saved_epoch = opt.epoch  # a consistent snapshot: taken drained, like an update
            self.server.call(self.runtime.apply_update(self.save), 120)

    def save(self) -> None:
        save_stage(self.peer.cfg, self.stage, self.optimizer, self.peer.session.fingerprint)

    def stop_stepping(self, timeout: float) -> None:
        """No more averaging rounds in this stage; returns once a round under way has ended. A move calls it
        before it announces the peer in its next stage: from then on the stage-mates no longer count it, and
        would turn it away from a round (and it would wait for them in vain)."""
        self.optimizer.leaving = True
        try:
            self.server.call(self.runtime.no_update(), timeout)
        except concurrent.futures.TimeoutError:
            logger.warning("stage %d: an update still runs after %.0f s; moving anyway", self.stage, timeout)

    def leave(self, announce: bool = True) -> bool:
        """Finish the in-flight microbatches, save, leave the stage's averaging.

        :param announce: say DRAINING first (a move has already announced the peer in its next stage, which
            also took it out of this one's routing)
        :returns: whether everything in flight finished within the grace period"""
        if announce:
            self.peer.announcer.update(state=PeerState.DRAINING)
            self.peer.announcer.write_now()
        if self.watcher is not None:
            self.watcher.cancel()
        finished = self.server.stop(grace=DRAIN_GRACE_S)
        self.save()
        self.close()
        return finished

    def summary(self) -> dict:
        opt = self.optimizer
        return {"stage": self.stage, "endpoint": self.server.address, "served": self.server.servicer.counters["ok"],
                "epoch": opt.epoch, "steps": opt.steps, "resyncs": opt.resyncs, "carried": opt.carried,
                "step_samples": [list(s) for s in opt.step_samples],
                "compute_s": {k: round(v, 2) for k, v in self.runtime.worker.busy_s.items()},
                "recomputed": self.runtime.recomputed}

    def close(self) -> None:
        """Stop everything at once (idempotent): the end of a move, or of the process."""
        if self.server is not None:
            self.server.stop(grace=0)
        if not self.closed:
            self.closed = True
            self.optimizer.shutdown()


class StagePeer:
    """The process-wide parts of a stage peer (DHT session, directory, record) around its current
    :class:`StageParts`."""

    def __init__(self, cfg: RunConfig, session: Session, directory: Directory, announcer, device, vocab: int,
                 tls: ServerTLS | None = None):
        self.cfg, self.session, self.directory, self.announcer = cfg, session, directory, announcer
        self.device, self.vocab, self.me, self.tls = device, vocab, announcer_id(announcer), tls
        self.parts: StageParts | None = None
        self.moves: list[dict] = []
        costs = stage_costs(cfg.model.preset, vocab, cfg.data.seq_len, cfg.model.stages, cfg.model.partition)
        self.rebalancer = Rebalancer(cfg, self.me, costs)

    def serve(self, stop: StopFlag) -> None:
        """Serve the current stage until ``stop``; move when the rebalancing policy says so."""
        while not stop.wait(0.5):
            self.parts.tick()
            if self.rebalancer.due():
                move = self.rebalancer.propose(self.directory)
                if move is not None and (move := self.rebalancer.confirm(self.directory, stop)) is not None:
                    self.move(move)

    def move(self, move) -> None:
        """Announce the peer JOINING ``move.target`` (which takes it out of its stage's routing and counts it
        where it goes, so no one else follows it there meanwhile), finish this stage's in-flight work, save
        and leave it, then build the new stage, download its state from its peers and go ONLINE."""
        old, started = self.parts, time.monotonic()
        logger.info("rebalancing: moving %s", move.describe())
        old.stop_stepping(timeout=self.cfg.peer.matchmaking_time + self.cfg.peer.averaging_timeout + DRAIN_GRACE_S)
        now = self.rebalancer.clock()
        estimate = move.after[move.target] - move.before[move.target]  # until it measures itself there
        self.announcer.update(stage=move.target, state=PeerState.JOINING, endpoint=None, queue=0, inflight=0,
                              throughput=estimate, throughput_ema=None, moves=self.announcer.record.moves + 1,
                              moved_at=now)
        self.announcer.write_now()  # OFFLINE in the old stage, JOINING in the new one
        drained = old.leave(announce=False)
        served = old.server.servicer.counters["ok"]
        self.parts = None
        self.parts = StageParts(self, move.target)
        self.parts.go_online()
        self.rebalancer.restart()
        took = time.monotonic() - started
        self.moves.append({"from": move.source, "to": move.target, "at": round(now, 1), "took_s": round(took, 1),
                           "drained": drained, "served_before": served, "state_from": self.parts.source})
        logger.info("rebalancing: stage %d peer ONLINE at %s after %.1f s (state from %s, epoch %d)", move.target,
                    self.parts.server.address, took, self.parts.source, self.parts.optimizer.epoch)


def run_stage_peer(cfg: RunConfig, stop: StopFlag) -> dict:
    """Serve a stage until ``stop`` is set (moving between stages with ``--stage auto``); returns a summary."""
    from dht.announce import Announcer, new_peer_record  # hivemind (and its uvloop policy) once a peer starts
    from dht.peers import live_peers

    limit_threads(cfg.train.threads)
    tls = load_server_tls(cfg.peer.tls_cert, cfg.peer.tls_key) if cfg.peer.tls_cert else None  # before the DHT
    session = Session(cfg).start()
    cfg, node = session.cfg, session.node
    directory = announcer = peer = None
    summary: dict = {"command": "join", "run_id": cfg.swarm_run_id}
    try:
        directory = Directory(lambda: live_peers(node, cfg.model.stages), cfg.model.stages, refresh_s=1.0).start()
        stage = pick_stage(cfg, directory)
        device = resolve_device(cfg.train.device)
        vocab = run_vocab(session.record, cfg)  # from the owner's record: a stage peer reads no data
        announcer = Announcer(node, new_peer_record(stage, __version__, session.fingerprint,
                                                    public_name=cfg.peer.public_name, auto_stage=cfg.peer.stage ==
                                                    "auto", dht_peer_id=str(node.dht.peer_id),
                                                    tls_sha256=tls.sha256 if tls else None),
                              update_period=cfg.net.update_period).start()
        logger.info("joining run %s as a stage %d/%d peer (%s, %s)", cfg.swarm_run_id, stage, cfg.model.stages,
                    cfg.model.preset, device)
        peer = StagePeer(cfg, session, directory, announcer, device, vocab, tls)
        peer.parts = parts = StageParts(peer, stage)
        if stop:  # told to leave while joining: nothing is in flight, so do not go ONLINE at all
            logger.info("%s while joining: leaving before serving", stop.signal_name)
            summary.update(stage=stage, served=0, epoch=parts.optimizer.epoch, steps=0, resyncs=0, drained=True,
                           uptime_s=0.0, stopped_by=stop.signal_name)
            return summary
        parts.go_online()
        peer.rebalancer.restart()
        logger.info("stage %d peer ONLINE at %s: %.1f samples/s (%s), state from %s, epoch %d", stage,
                    parts.server.address, parts.throughput.samples_per_s, parts.throughput.source, parts.source,
                    parts.optimizer.epoch)
        started = time.time()
        peer.serve(stop)

        logger.info("%s: leaving (DRAINING), finishing in-flight microbatches", stop.signal_name)
        parts = peer.parts
        finished = parts.leave()
        summary.update(parts.summary(), drained=finished, uptime_s=round(time.time() - started, 1),
                       stopped_by=stop.signal_name, moves=peer.moves)
        summary["served"] += sum(m["served_before"] for m in peer.moves)  # every stage it served
        return summary
    finally:
        if peer is not None and peer.parts is not None:
            peer.parts.close()
        if announcer is not None:
            written = announcer.stop(PeerState.OFFLINE)
            logger.info("announced OFFLINE%s; leaving", "" if written else " (no DHT node took the record)")
        if directory is not None:
            directory.stop()
        session.shutdown()


def announcer_id(announcer) -> str:
    from dht.signing import key_id  # hivemind, as above

    return key_id(announcer.subkey)
