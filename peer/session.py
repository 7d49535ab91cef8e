"""Joining a run: start this process's DHT node, take the run's config (signed by its owner), refuse a mismatch.

A peer that only says ``--initial-peers`` gets the run's model and optimizer settings from the
run's config record, signed by the run's owner (``dht.owner``); whatever it sets itself (flag,
``SWARM_`` variable, TOML) must agree with the run, or it is refused with both hashes and the
differing fields. Nothing that names a local file or a Hub repository comes from the record: a
trainer reads its own ``--dataset`` and ``--tokenizer``, and is refused if its tokenizer is not the
run's (by fingerprint); stage peers take the vocabulary size from the record and load no data.
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


def tokenizer_fields(tokenizer) -> dict:
    """What the run's record says of its tokenizer (set by the owner from its own data settings)."""
    return {"tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint, "vocab": tokenizer.vocab_size}


def check_tokenizer(record, tokenizer, cfg: RunConfig) -> None:
    """Refuse to train with a tokenizer other than the run's: the same ids would mean other tokens.

    :raises ConfigError: naming both tokenizers and what to change
    """
    if record is None or not record.tokenizer_fingerprint or record.tokenizer_fingerprint == tokenizer.fingerprint:
        return
    raise ConfigError(
        f"this trainer's tokenizer ({tokenizer.name}, fingerprint {tokenizer.fingerprint}, from --dataset "
        f"{cfg.data.dataset} and --tokenizer {cfg.data.tokenizer}) is not the run's ({record.tokenizer}, fingerprint "
        f"{record.tokenizer_fingerprint}): a `bpe` tokenizer is trained on the dataset, so use the data the run's "
        f"owner used, or pass the run's Hub --tokenizer yourself")


def run_vocab(record, cfg: RunConfig) -> int:
    """The model's vocabulary size: the run's record says it (a stage peer loads no data to learn it)."""
    if record is None or not record.vocab:
        raise ConfigError(f"the config record of run {cfg.swarm_run_id!r} does not say the model's vocabulary size "
                          f"(its bootstrap is older than this peer); restart the bootstrap with this version")
    return record.vocab


class Session:
    """The DHT node of a swarm command, the run config it agreed on and the run's admission.

    :param client_mode: a trainer or inspector only reads and writes records; stage peers serve the DHT too
    :param role: what this process does in the run (``peer``, ``trainer``, ``observer``): in an invite-only run its
      invitation must allow it
    """

    def __init__(self, cfg: RunConfig, *, client_mode: bool = False, role: str = "peer"):
        self.requested = cfg
        self.client_mode, self.role = client_mode, role
        self.node = None
        self.keeper = None
        self.revocations = None
        self.admission = None  # dht.admission.Admission, once joined
        self.record = None  # the run's config record, signed by its owner
        self.cfg = cfg

    def start(self) -> "Session":
        from dht.node import SwarmNode  # hivemind (and its uvloop policy) only when a command joins
        from dht.owner import run_owner
        from dht.runconfig import RunConfigKeeper, find_run_config

        cfg = self.requested
        if not cfg.net.initial_peers:
            raise ConfigError("this command needs --initial-peers MADDR (a line printed by `swarm-peer bootstrap`) "
                              "or SWARM_INITIAL_PEERS")
        owner = run_owner(cfg.net.initial_peers, cfg.net.run_owner)
        key, invite, authorizer = member_access(cfg, owner, self.role)
        self.node = SwarmNode.start(cfg.swarm_run_id, cfg.net.initial_peers, host_maddrs=cfg.net.host_maddrs,
                                    announce_maddrs=cfg.net.announce_maddrs, identity_path=cfg.net.identity_path,
                                    client_mode=self.client_mode, keys=[key], authorizer=authorizer)
        try:
            published = find_run_config(self.node, owner)
            self._admit(published, owner, key, invite)
            self.cfg = adopt(cfg, published.config)
            self._check_clock()
            self.keeper = RunConfigKeeper(self.node, self.cfg.shared(), __version__, owner=owner,
                                          update_period=cfg.net.update_period)
            self.record = self.keeper.start(known=published)  # one read of the run's record, not two
        except BaseException:
            self.shutdown()
            raise
        lower_background_priority(cfg.net.background_nice)  # the DHT node's process and its p2pd
        return self

    def _check_clock(self) -> None:
        """Refuse to go on with a clock far off the swarm's (judged from the other peers' stage records)."""
        from hivemind.utils.timed_storage import get_dht_time

        from dht.clock import check_clock
        from dht.peers import read_stages

        try:
            stages = read_stages(self.node, range(self.cfg.model.stages), timeout=10.0)
        except TimeoutError:  # the DHT is slow: the next reads will say more
            return
        mine = self.node.owner_subkey
        check_clock([p.record.updated_at for peers in stages.values() for p in peers if p.subkey != mine],
                    get_dht_time())

    def _admit(self, record, owner: str, key, invite) -> None:
        from dht.admission import Admission
        from dht.revocations import RevocationKeeper

        self.admission = Admission(self.node.run_id, record.admission, owner, key, invite)
        if self.admission.closed:
            self.revocations = RevocationKeeper(self.node, self.admission, self.requested.net.update_period).start()
            problem = self.admission.own_problem()
            if problem:
                raise ConfigError(f"--invite: {problem}")

    @property
    def fingerprint(self) -> str:
        return self.keeper.local.hash

    def shutdown(self) -> None:
        if self.revocations is not None:
            self.revocations.stop()
            self.revocations = None
        if self.keeper is not None:
            self.keeper.stop()
            self.keeper = None
        if self.node is not None:
            self.node.shutdown()
            self.node = None


def member_access(cfg: RunConfig, owner: str, role: str):
    """This process's record-signing key, its invitation (None without ``--invite``) and the DHT authorizer that
    carries it (None without).

    :raises ConfigError: the invitation cannot admit this process (another key, run or role; expired)
    """
    from dht.admission import OWNER_ROLE, InviteAuthorizer, invite_problem, read_invite
    from dht.node import member_key

    key = member_key(cfg.net.identity_path)
    if not cfg.net.invite:
        return key, None, None
    invite = read_invite(cfg.net.invite)
    problem = invite_problem(invite, cfg.swarm_run_id, owner)
    if problem is None and invite.member_key != key.get_public_key().to_bytes():
        problem = (f"it was made for another key: run with the --identity-path whose key `swarm-peer identity` "
                   f"showed when the invitation was asked for (this one: {cfg.net.identity_path or 'none given'})")
    if problem is None and invite.role not in (role, OWNER_ROLE) and role != "observer":
        problem = f"it invites a {invite.role}, and this command runs a {role}"
    if problem:
        raise ConfigError(f"--invite: {problem}")
    return key, invite, InviteAuthorizer(key, invite, owner)


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


def endpoint_scope(cfg: RunConfig) -> str:
    """``--endpoint-scope``, or for ``auto`` the widest class of the initial peers' addresses (host names resolved
    here, once): see ``peer.swarm.routing.SCOPES``."""
    from peer.swarm import routing

    if cfg.net.endpoint_scope != "auto":
        return cfg.net.endpoint_scope
    classes = []
    for maddr in cfg.net.initial_peers:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            classes.append(routing.address_class(parts[2]))
        elif len(parts) > 2 and parts[1] in ("dns", "dns4", "dns6"):
            try:
                classes += [routing.address_class(info[4][0]) for info in socket.getaddrinfo(parts[2], None)]
            except OSError:
                continue
    return routing.widest_scope(classes)


def announce_host(cfg: RunConfig) -> str:
    """``--announce-host``, else the listening host, else the local address towards the initial peers."""
    if cfg.peer.announce_host:
        return cfg.peer.announce_host
    if cfg.peer.host not in ("0.0.0.0", "::", ""):
        return cfg.peer.host
    return local_address_towards(cfg.net.initial_peers)
