"""``swarm-peer bootstrap``: a DHT root others join, which also publishes the run's config record.

It stores records like any other node (with the run's schema and signature checks) and
prints one ``--initial-peers <multiaddr>`` line per address it can be reached at. With
``--identity-path`` its peer id stays the same across restarts, and with a fixed port in
``--host-maddrs`` so does the whole line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from dht.node import SwarmNode
from dht.records import RunConfigRecord
from dht.runconfig import RunConfigKeeper

logger = logging.getLogger(__name__)


class Bootstrap:
    """A running bootstrap node: the DHT node and the keeper of the run's config record."""

    def __init__(self, node: SwarmNode, keeper: RunConfigKeeper, record: RunConfigRecord):
        self.node, self.keeper, self.record = node, keeper, record

    @classmethod
    def start(cls, run_id: str, config: dict[str, Any], version: str, *, initial_peers: Sequence[str] = (),
              host_maddrs: Sequence[str] = (), announce_maddrs: Sequence[str] = (),
              identity_path: Path | None = None, update_period: float = 15.0) -> "Bootstrap":
        """Start the node, check the run's config (if the swarm already has one) and publish ours.

        :raises NoInitialPeersError: ``initial_peers`` given but none answered
        :raises RunConfigMismatch: joining a swarm whose run has another config hash
        """
        node = SwarmNode.start(run_id, initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
                               identity_path=identity_path)
        try:
            keeper = RunConfigKeeper(node, config, version, update_period=update_period)
            record = keeper.start()
        except BaseException:
            node.shutdown()
            raise
        return cls(node, keeper, record)

    def initial_peers(self) -> list[str]:
        """The addresses to give to other peers."""
        return self.node.visible_maddrs()

    def lines(self) -> list[str]:
        """One copy-pasteable ``--initial-peers <multiaddr>`` line per visible address."""
        return [f"--initial-peers {maddr}" for maddr in self.initial_peers()]

    def summary(self) -> dict[str, Any]:
        return {"kind": "bootstrap", "run": self.node.run_id, "config_hash": self.record.hash,
                "initial_peers": self.initial_peers(), "peer_id": str(self.node.dht.peer_id)}

    def shutdown(self) -> None:
        self.keeper.stop()
        self.node.shutdown()
