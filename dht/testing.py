"""Helpers that build real swarms on localhost, for tests, benchmarks and demos.

* :class:`LocalSwarm` - a few DHT nodes on 127.0.0.1 with the run's validators.
* :class:`FakePeers` - many stage peers announced from one process: real signed records
  (one owner key each, one DHT node signing for all of them) with made-up figures and
  no gRPC server behind them, so the inspector and routers can be exercised at scale.
* ``python -m dht.testing --initial-peers ADDR --stage K``: one such peer as a process of
  its own, announcing until SIGINT/SIGTERM and then writing OFFLINE, as a real peer does.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from hivemind.utils.crypto import RSAPrivateKey

from dht.announce import Announcer, new_peer_record
from dht.errors import ControlPlaneError
from dht.node import LOOPBACK_MADDRS, SwarmNode
from dht.records import PeerState
from dht.signing import key_id

logger = logging.getLogger(__name__)


class LocalSwarm:
    """``size`` DHT nodes of run ``run_id`` on 127.0.0.1; the first is the root the others join.

    :param wait_timeout: DHT RPC timeout (short, so a dead node does not slow tests down)
    """

    def __init__(self, run_id: str, size: int = 2, wait_timeout: float = 1.0):
        self.run_id, self.wait_timeout = run_id, wait_timeout
        self.nodes: list[SwarmNode] = []
        try:
            for _ in range(size):
                self.add_node()
        except BaseException:
            self.close()
            raise

    @property
    def initial_peers(self) -> list[str]:
        return self.nodes[0].visible_maddrs()

    def add_node(self, **kwargs: Any) -> SwarmNode:
        """Start one more node that joins the swarm (kwargs go to :meth:`SwarmNode.start`); closed with the swarm."""
        kwargs.setdefault("wait_timeout", self.wait_timeout)
        kwargs.setdefault("host_maddrs", LOOPBACK_MADDRS)
        try:
            node = SwarmNode.start(self.run_id, self.initial_peers if self.nodes else (), **kwargs)
        except ControlPlaneError as e:
            if not isinstance(e.__cause__, TimeoutError):
                raise
            # a loaded machine (a CI run of multi-process tests) can keep a node's daemon from starting in time
            logger.warning("a local DHT node did not start in time (%s); trying once more", e)
            node = SwarmNode.start(self.run_id, self.initial_peers if self.nodes else (), **kwargs)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.shutdown()
        self.nodes.clear()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_keys(count: int) -> list[RSAPrivateKey]:
    """``count`` fresh RSA keys (about 40 ms each on a CPU core)."""
    return [RSAPrivateKey() for _ in range(count)]


class FakePeers:
    """``per_stage`` fake stage peers for each of ``num_stages`` stages, announced through one DHT node.

    Peer ``i`` of stage ``k`` is ONLINE at ``127.0.0.1:<20000 + 100 k + i>`` with throughput
    ``10 (k + 1) + i`` unless ``record_fields`` says otherwise.
    """

    def __init__(self, initial_peers: Iterable[str], run_id: str, num_stages: int, per_stage: int,
                 update_period: float = 60.0, version: str = "0.0.0-fake", fingerprint: str = "",
                 keys: list[RSAPrivateKey] | None = None, workers: int = 8, **record_fields: Any):
        total = num_stages * per_stage
        self.keys = keys or make_keys(total)
        self.node = SwarmNode.start(run_id, list(initial_peers), keys=self.keys, wait_timeout=1.0)
        self.announcers: list[Announcer] = []
        try:
            self._announce(num_stages, per_stage, update_period, version, fingerprint, workers, record_fields)
        except BaseException:
            self.node.shutdown()
            raise

    def _announce(self, num_stages, per_stage, update_period, version, fingerprint, workers, record_fields) -> None:
        for k in range(num_stages):
            for i in range(per_stage):
                fields = dict(state=PeerState.ONLINE, endpoint=f"127.0.0.1:{20000 + 100 * k + i}",
                              throughput=float(10 * (k + 1) + i), public_name=f"fake-{k}-{i}")
                fields.update(record_fields)
                record = new_peer_record(k, version, fingerprint, **fields)
                key = self.keys[k * per_stage + i]
                self.announcers.append(Announcer(self.node, record, update_period=update_period, key=key))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(Announcer.start, self.announcers))

    def close(self, offline: bool = False) -> None:
        """Stop refreshing (writing OFFLINE records if ``offline``), then shut the node down."""
        for ann in self.announcers:
            if offline:
                ann.stop()
            else:
                ann.abandon()
        self.node.shutdown()

    def __enter__(self) -> "FakePeers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """One fake ONLINE peer: prints its peer id, announces until SIGINT/SIGTERM, then writes OFFLINE."""
    p = argparse.ArgumentParser(prog="python -m dht.testing", description=main.__doc__)
    p.add_argument("--initial-peers", action="append", required=True, metavar="MADDR")
    p.add_argument("--run-id", default="swarm")
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--update-period", type=float, default=15.0)
    p.add_argument("--throughput", type=float, default=10.0)
    p.add_argument("--endpoint", default="127.0.0.1:1")
    p.add_argument("--public-name", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    node = SwarmNode.start(args.run_id, args.initial_peers)
    stop = threading.Event()
    # installed after the DHT process was forked, so that it keeps the default actions
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        record = new_peer_record(args.stage, "0.0.0-fake", state=PeerState.ONLINE, endpoint=args.endpoint,
                                 throughput=args.throughput, public_name=args.public_name)
        with Announcer(node, record, update_period=args.update_period) as ann:
            print(key_id(ann.subkey), flush=True)
            stop.wait()
    finally:
        node.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
