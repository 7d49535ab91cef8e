"""``swarm-peer join``: one stage peer, from joining the run to leaving it.

1. join the DHT and take the run's config (refusing a mismatch), pick the stage (``--stage K``
   or ``auto``: the stage with the least ONLINE throughput), announce JOINING;
2. build the stage from the run's seed, then download the stage's current state from its
   peers if it has any (else: from ``--checkpoint-dir`` if it holds this stage, else the seed);
3. measure (or read the cached) throughput, start the gRPC server with a router to the
   next stage, announce ONLINE with its endpoint and throughput;
4. serve: the stage's hivemind collaboration steps every global batch; queue, in-flight and
   epoch go into the record every refresh;
5. on SIGTERM/SIGINT: announce DRAINING, finish in-flight microbatches, save a checkpoint,
   announce OFFLINE, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from peer import __version__
from dht.records import PeerState
from peer import checkpoint as ckpt
from peer.config import RunConfig
from peer.data import load_data
from peer.errors import ConfigError
from peer.partition import build_stage
from peer.priority import lower_background_priority
from peer.stage.averaging import StageOptimizer
from peer.stage.runtime import StageRuntime, StageSpec
from peer.stage.server import StageServer
from peer.stage.throughput import LiveThroughput, throughput_for
from peer.swarm.directory import Directory, StageRouter
from peer.session import Session, announce_host
from peer.training import StopFlag, limit_threads, resolve_device

logger = logging.getLogger("peer.join")
DRAIN_GRACE_S = 25.0  # SIGTERM -> exit stays within the documented 30 s


def pick_stage(cfg: RunConfig, directory: Directory) -> int:
    """``--stage K``, or the stage with the least ONLINE throughput (then fewest peers, then lowest index)."""
    stages = cfg.model.stages
    if cfg.peer.stage != "auto":
        stage = int(cfg.peer.stage)
        if stage >= stages:
            raise ConfigError(f"--stage {stage}: run {cfg.swarm_run_id!r} has stages 0..{stages - 1}")
        return stage
    directory.refresh()
    return min(range(stages), key=lambda k: (directory.throughput(k), len(directory.peers(k)), k))


def stage_checkpoint_dir(cfg: RunConfig, stage: int) -> Path | None:
    base = cfg.train.checkpoint_dir
    return Path(base) / f"stage-{stage}" if base else None


def run_stage_peer(cfg: RunConfig, stop: StopFlag) -> dict:
    """Serve one stage until ``stop`` is set; returns a summary of what this peer did."""
    from dht.announce import Announcer, new_peer_record  # hivemind (and its uvloop policy) once a peer starts
    from dht.peers import live_peers

    limit_threads(cfg.train.threads)
    session = Session(cfg).start()
    cfg, node = session.cfg, session.node
    directory = announcer = server = optimizer = None
    summary: dict = {"command": "join", "run_id": cfg.swarm_run_id}
    try:
        directory = Directory(lambda: live_peers(node, cfg.model.stages), cfg.model.stages, refresh_s=1.0).start()
        stage = pick_stage(cfg, directory)
        device = resolve_device(cfg.train.device)
        vocab = load_data(cfg.data).vocab_size
        announcer = Announcer(node, new_peer_record(stage, __version__, session.fingerprint,
                                                    public_name=cfg.peer.public_name,
                                                    dht_peer_id=str(node.dht.peer_id)),
                              update_period=cfg.net.update_period).start()
        logger.info("joining run %s as a stage %d/%d peer (%s, %s)", cfg.swarm_run_id, stage, cfg.model.stages,
                    cfg.model.preset, device)

        module = build_stage(cfg.model.preset, vocab, cfg.data.seq_len, cfg.train.seed, stage,
                             cfg.model.stages, cfg.model.partition).to(device)
        me = announcer_id(announcer)

        def mates() -> list[str]:  # the other live peers of this stage that can share state
            return [p.peer_id for p in directory.peers(stage)
                    if p.peer_id != me and p.record.state != PeerState.JOINING]

        optimizer = StageOptimizer(node.dht, cfg.swarm_run_id, stage, module, cfg, key=node.key,
                                   me=me, mates=mates)
        directory.refresh()
        source = "peers" if optimizer.mates() and optimizer.load_state_from_peers() else \
            _restore(cfg, stage, optimizer, session.fingerprint)
        optimizer.publish_digest()
        optimizer.share_state()  # it holds the stage's state now: others may download it
        optimizer.refresh()  # who else averages, before the first microbatch
        lower_background_priority(cfg.net.background_nice)  # the averagers' processes are new

        throughput = throughput_for(cfg, stage, vocab)
        spec = StageSpec(cfg.swarm_run_id, stage, cfg.model.stages, module.config.hidden_size, vocab,
                         max_microbatch=max(64, cfg.train.microbatch_size), max_seq_len=cfg.data.seq_len,
                         fingerprint=session.fingerprint)
        drain = cfg.peer.drain_timeout if cfg.peer.drain_timeout != float("inf") else None
        runtime = StageRuntime(module, spec, device, cfg.train.precision, on_backward=optimizer.on_backward,
                               drain_timeout=drain, slowdown=cfg.peer.compute_slowdown)
        live = LiveThroughput()
        router = StageRouter(directory, stage + 1, seed=cfg.train.seed) if stage + 1 < cfg.model.stages else None
        server = StageServer(runtime, router, host=cfg.peer.host, port=cfg.peer.port,
                             announce_host=announce_host(cfg), max_in_flight=cfg.peer.max_in_flight,
                             attempt_timeout=cfg.link.attempt_timeout, peer_name=cfg.peer.public_name or "").start()
        if stop:  # told to leave while joining: nothing is in flight, so do not go ONLINE at all
            logger.info("%s while joining: leaving before serving", stop.signal_name)
            summary.update(stage=stage, served=0, epoch=optimizer.epoch, steps=0, resyncs=0, drained=True,
                           uptime_s=0.0, stopped_by=stop.signal_name)
            return summary
        watcher = asyncio.run_coroutine_threadsafe(optimizer.watch(runtime), server.loop)
        announcer.update(state=PeerState.ONLINE, endpoint=server.address, throughput=throughput.samples_per_s,
                         step=optimizer.epoch)
        logger.info("stage %d peer ONLINE at %s: %.1f samples/s (%s), state from %s, epoch %d", stage,
                    server.address, throughput.samples_per_s, throughput.source, source, optimizer.epoch)

        started, served, saved_epoch = time.time(), 0, optimizer.epoch
        while not stop:
            time.sleep(0.5)
            servicer = server.servicer
            served = servicer.counters["ok"]
            announcer.update(queue=runtime.worker.queue_size, inflight=servicer.in_flight, step=optimizer.epoch,
                             throughput_ema=live.update(runtime.samples_trained, runtime.compute_s))
            every = cfg.train.checkpoint_interval
            if every and stage_checkpoint_dir(cfg, stage) and optimizer.epoch >= saved_epoch + every:
                saved_epoch = optimizer.epoch  # a consistent snapshot: taken drained, like an update
                server.call(runtime.apply_update(lambda: _save(cfg, stage, optimizer, session.fingerprint)), 120)

        logger.info("%s: leaving (DRAINING), finishing in-flight microbatches", stop.signal_name)
        announcer.update(state=PeerState.DRAINING)
        announcer.write_now()
        watcher.cancel()
        finished = server.stop(grace=DRAIN_GRACE_S)
        _save(cfg, stage, optimizer, session.fingerprint)
        summary.update(stage=stage, endpoint=server.address, served=served, epoch=optimizer.epoch,
                       steps=optimizer.steps, resyncs=optimizer.resyncs, drained=finished,
                       uptime_s=round(time.time() - started, 1), stopped_by=stop.signal_name,
                       compute_s={k: round(v, 2) for k, v in runtime.worker.busy_s.items()},
                       recomputed=runtime.recomputed)
        return summary
    finally:
        if server is not None:
            server.stop(grace=0)
        if announcer is not None:
            written = announcer.stop(PeerState.OFFLINE)
            logger.info("announced OFFLINE%s; leaving", "" if written else " (no DHT node took the record)")
        if optimizer is not None:
            optimizer.shutdown()
        if directory is not None:
            directory.stop()
        session.shutdown()


def announcer_id(announcer) -> str:
    from dht.signing import key_id  # hivemind, as above

    return key_id(announcer.subkey)


def _identity(stage: int, fingerprint: str) -> dict:
    """What a stage checkpoint must match to be loaded: the run's config fingerprint and the stage."""
    return {"fingerprint": fingerprint, "stage": stage}


def _restore(cfg: RunConfig, stage: int, optimizer: StageOptimizer, fingerprint: str = "") -> str:
    """The stage's own last checkpoint when no peer has its state; else the run's seed."""
    directory = stage_checkpoint_dir(cfg, stage)
    latest = ckpt.latest_checkpoint(directory) if directory else None
    if latest is None:
        return "seed"
    state = ckpt.load_checkpoint(latest)
    ckpt.check_compatible(state.get("identity", {}), _identity(stage, fingerprint), latest)
    optimizer.load_checkpoint(state)
    logger.info("stage %d: restored %s (epoch %d)", stage, latest, optimizer.epoch)
    return f"checkpoint {latest.name}"


def _save(cfg: RunConfig, stage: int, optimizer: StageOptimizer, fingerprint: str) -> None:
    directory = stage_checkpoint_dir(cfg, stage)
    if directory is not None:
        state = {**optimizer.checkpoint_state(), "identity": _identity(stage, fingerprint)}
        ckpt.save_checkpoint(directory, optimizer.epoch, state, cfg.train.keep_checkpoints)
