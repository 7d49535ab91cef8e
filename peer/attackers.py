"""Hostile peers, for the tests and ``benchmarks/attacks.py``: what a stranger who reaches a run's DHT can do.

* :func:`plant_config`: publish the run's config record "earlier" than its owner did, with other values (say
  lr 1.0, a local file as dataset and another vocabulary), signed with the stranger's own key.
* :class:`StateThief`: a member of a stage's hivemind collaboration with no stage record, every parameter set
  to one value, claiming a far higher epoch in its progress record and sharing its state at the top priority.
* :class:`GradientPoisoner`: the same kind of member, joining every gradient round of the stage with huge
  gradients at a huge weight.
* :class:`LossForger`: a fake stage peer with a valid (self-signed) stage record announcing a huge throughput, that
  answers every microbatch at once with a made-up loss and computes nothing.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

FAR_EPOCH = 10_000
ROUND_S = 20.0  # the poisoner's deadline for one gradient round


def plant_config(initial_peer: str, run_id: str, expires_in: float = 600.0, **changes: Any) -> dict:
    """Store a stranger's config record for ``run_id`` (the owner's config with ``changes``, published at time 1);
    returns the config it published."""
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.timed_storage import get_dht_time

    from dht.announce import store_value
    from dht.keys import config_key
    from dht.node import SwarmNode
    from dht.owner import run_owner, sign_record
    from dht.records import RunConfigRecord
    from dht.runconfig import find_run_config

    with SwarmNode.start(run_id, [initial_peer], client_mode=True) as node:
        run = find_run_config(node, run_owner([initial_peer]))
        evil = {**run.config, **changes}
        record = sign_record(RunConfigRecord.create(run_id, evil, "0.1.0", published_at=1.0, vocab=300,
                                                    tokenizer_fingerprint="0" * 16), RSAPrivateKey())
        if not store_value(node, config_key(run_id), node.owner_subkey, record.to_dht(), get_dht_time() + expires_in):
            raise RuntimeError("no DHT node stored the stranger's config record")
    return evil


class StateThief:
    """A stage's collaboration member without a stage record: parameters all ``value``, at ``epoch``, sharing
    its state at priority ``epoch``. ``config``: the run's shared settings (``preset``, ``stages``,
    ``batch_size``, ...) that shape the stage and its optimizer state."""

    def __init__(self, initial_peer: str, run_id: str, stage: int, config: dict[str, Any],
                 epoch: int = FAR_EPOCH, value: float = 0.5):
        from dht.node import SwarmNode
        from dht.owner import run_owner
        from dht.runconfig import find_run_config
        from peer.config import load_config
        from peer.partition import build_stage
        from peer.stage.averaging import StageOptimizer

        self.epoch = epoch
        self.node = SwarmNode.start(run_id, [initial_peer])
        try:
            vocab = find_run_config(self.node, run_owner([initial_peer])).vocab
            cfg = load_config(config)
            module = build_stage(cfg.model.preset, vocab, cfg.data.seq_len, cfg.train.seed, stage, cfg.model.stages,
                                 cfg.model.partition)
            with torch.no_grad():
                for p in module.parameters():
                    p.fill_(value)
            self.optimizer = StageOptimizer(self.node.dht, run_id, stage, module, cfg, key=self.node.key,
                                            me="thief", mates=lambda: [])
        except BaseException:
            self.node.shutdown()
            raise
        averager = self.optimizer.opt.state_averager
        averager.local_epoch = epoch
        averager.state_sharing_priority = float(epoch)
        averager.allow_state_sharing = True
        self.optimizer.opt.tracker.report_local_progress(epoch, cfg.train.batch_size)
        self.peer_id = str(self.node.dht.peer_id)

    def declared(self) -> bool:
        """Its progress record (at its epoch) and its averager's declaration are in the DHT."""
        opt = self.optimizer.opt
        progress = self.node.dht.get(opt.tracker.training_progress_key, latest=True)
        averagers = self.node.dht.get(f"{opt.state_averager.prefix}.all_averagers", latest=True)
        if not progress or not averagers or not isinstance(progress.value, dict):
            return False
        claims = any(isinstance(v.value, dict) and v.value.get("epoch") == self.epoch for v in progress.value.values())
        return claims and isinstance(averagers.value, dict) and opt.state_averager.peer_id.to_bytes() in \
            averagers.value

    def close(self) -> None:
        self.optimizer.shutdown()
        self.node.shutdown()

    def __enter__(self) -> "StateThief":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GradientPoisoner(StateThief):
    """A stage's collaboration member without a stage record that joins gradient rounds with every gradient
    ``gradient`` at weight ``weight``, one round after another until closed. ``groups`` lists the size of each
    group it averaged in (1: none, or only itself); ``failed`` counts the rounds that failed."""

    def __init__(self, initial_peer: str, run_id: str, stage: int, config: dict[str, Any], group_size: int,
                 gradient: float = 1e4, weight: float = 1e3):
        super().__init__(initial_peer, run_id, stage, config, epoch=0)
        self.gradient, self.weight, self.groups, self.failed = gradient, weight, [], 0
        self.optimizer.opt.grad_averager.set_target_group_size(group_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._rounds, name="poisoner", daemon=True)
        self._thread.start()

    def _rounds(self) -> None:
        averager = self.optimizer.opt.grad_averager
        while not self._stop.is_set():
            with torch.no_grad():
                for p in self.optimizer.module.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.fill_(self.gradient)
            averager.accumulate_grads_(batch_size=1)
            control = averager.step(weight=self.weight, timeout=ROUND_S, wait=False)
            try:
                self.groups.append(len(control.result(ROUND_S + 10)))
            except Exception:  # noqa: BLE001 - refused, or nobody came: try again
                self.failed += 1
                if not control.done():
                    control.cancel()
                self._stop.wait(1.0)  # hivemind ends a failed matchmaking in the background

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)
        super().close()


class LossForger:
    """A fake stage-``stage`` peer: a real gRPC server on ``host`` that acknowledges every Hop and answers with
    ``loss`` (no compute, no next stage), announced in the DHT as ONLINE with ``throughput`` samples/s under its
    own key. ``hops`` counts the microbatches it received."""

    def __init__(self, initial_peer: str, run_id: str, stage: int = 0, loss: float = 1.0,
                 throughput: float = 1e6, host: str = "127.0.0.1"):
        from concurrent import futures

        import grpc

        from dht.announce import Announcer, new_peer_record
        from dht.node import SwarmNode
        from dht.records import PeerState
        from peer import __version__
        from peer.rpc import stage_pb2 as pb
        from peer.rpc import wire

        self.loss, self.hops = loss, 0
        self._lock = threading.Lock()
        reply = wire.encode_reply([], pb.HopResult(loss=loss, samples=1, timings=[pb.HopTiming(stage=stage)]))

        def hop(requests, context):
            with self._lock:
                self.hops += 1
            yield b""  # the acknowledgement
            for _ in requests:  # the whole request, unread
                pass
            yield reply

        handler = grpc.method_handlers_generic_handler("swarm.v1.Stage", {"Hop": grpc.stream_stream_rpc_method_handler(
            hop, request_deserializer=None, response_serializer=None)})
        self.server = grpc.server(futures.ThreadPoolExecutor(8), handlers=(handler,))
        port = self.server.add_insecure_port(f"{host}:0")
        self.server.start()
        self.address = f"{host}:{port}"
        self.node = SwarmNode.start(run_id, [initial_peer], client_mode=True)
        try:
            self.announcer = Announcer(self.node, new_peer_record(
                stage, __version__, state=PeerState.ONLINE, endpoint=self.address, throughput=throughput,
                dht_peer_id=str(self.node.dht.peer_id)), update_period=1.0).start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "announcer", None) is not None:
            self.announcer.stop()
        self.node.shutdown()
        self.server.stop(0)

    def __enter__(self) -> "LossForger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
