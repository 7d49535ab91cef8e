"""Joining a run: start this process's DHT node, take the run's published config, refuse a mismatch.

A peer that only says ``--initial-peers`` gets the run's model, data and optimizer settings
from the run's config record; whatever it sets itself (flag, ``SWARM_`` variable, TOML) must
agree with the run, or it is refused with both hashes and the differing fields.
"""

from __future__ import annotations

import logging
import socket

from peer import __version__
from peer.config import SHARED_FIELDS, RunConfig
from peer.errors import ConfigError
from peer.priority import lower_background_priority

logger = logging.getLogger(__name__)


def adopt(cfg: RunConfig, published: dict | None) -> RunConfig:
    """``cfg`` with every shared field it does not set itself taken from the run's published config."""
    if not published:
        return cfg
    return cfg.with_defaults({name: value for name, value in published.items() if name in SHARED_FIELDS})


class Session:
    """The DHT node of a swarm command and the run config it agreed on.

    :param client_mode: a trainer or inspector only reads and writes records; stage peers serve the DHT too
    """

    def __init__(self, cfg: RunConfig, *, client_mode: bool = False):
        self.requested = cfg
        self.client_mode = client_mode
        self.node = None
        self.keeper = None
        self.cfg = cfg

    def start(self) -> "Session":
        from dht.node import SwarmNode  # hivemind (and its uvloop policy) only when a command joins
        from dht.runconfig import RunConfigKeeper, fetch_run_config

        cfg = self.requested
        if not cfg.net.initial_peers:
            raise ConfigError("this command needs --initial-peers MADDR (a line printed by `swarm-peer bootstrap`) "
                              "or SWARM_INITIAL_PEERS")
        self.node = SwarmNode.start(cfg.swarm_run_id, cfg.net.initial_peers, host_maddrs=cfg.net.host_maddrs,
                                    announce_maddrs=cfg.net.announce_maddrs, identity_path=cfg.net.identity_path,
                                    client_mode=self.client_mode)
        try:
            published = fetch_run_config(self.node)
            self.cfg = adopt(cfg, published.config if published else None)
            self.keeper = RunConfigKeeper(self.node, self.cfg.shared(), __version__, cfg.net.update_period)
            self.keeper.start()
        except BaseException:
            self.shutdown()
            raise
        lower_background_priority(cfg.net.background_nice)  # the DHT node's process and its p2pd
        return self

    @property
    def fingerprint(self) -> str:
        return self.keeper.local.hash

    def shutdown(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
            self.keeper = None
        if self.node is not None:
            self.node.shutdown()
            self.node = None


def local_address_towards(initial_peers: list[str]) -> str:
    """The local IP address that routes to the first initial peer (what others on that network dial)."""
    for maddr in initial_peers:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4"):
            host = parts[2]
            try:
                with socket.socket(socket.AF_INET6 if parts[1] == "ip6" else socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.connect((host, 9))  # UDP: no packet is sent
                    return s.getsockname()[0]
            except OSError:
                continue
    return "127.0.0.1"


def announce_host(cfg: RunConfig) -> str:
    """``--announce-host``, else the listening host, else the local address towards the initial peers."""
    if cfg.peer.announce_host:
        return cfg.peer.announce_host
    if cfg.peer.host not in ("0.0.0.0", "::", ""):
        return cfg.peer.host
    return local_address_towards(cfg.net.initial_peers)
