"""``swarm-peer bootstrap``: a DHT root others join, and the run's owner: it publishes the run's config record.

It stores records like any other node (with the run's schema and signature checks) and
prints one ``--initial-peers <multiaddr>`` line per address it can be reached at. The peer id at
the end of that line is the run's owner (:mod:`dht.owner`): the config record is signed with the
bootstrap's identity key. With ``--identity-path`` its peer id, and so its ownership of the run,
stays the same across restarts (without it the identity lives in a temporary directory for this
process only), and with a fixed port in ``--host-maddrs`` so does the whole line.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from dht.errors import ControlPlaneError
from dht.admission import OWNER_ROLE, Admission, InviteAuthorizer, issue_invite
from dht.node import SwarmNode, member_key
from dht.owner import load_or_create_identity, peer_id_of, run_owner
from dht.records import RunConfigRecord
from dht.revocations import RevocationKeeper
from dht.runconfig import RunConfigKeeper

OWN_INVITE_S = 10 * 365 * 86400.0  # the bootstrap's invitation to its own run: as long as the run lives


class SelfAdmission:
    """The owner's own admission to its invite-only run: an invitation of its record key, signed by its identity."""

    def __init__(self, owner_key, member, run_id: str, owner: str, seconds: float = OWN_INVITE_S):
        from hivemind.utils.timed_storage import get_dht_time

        invite = issue_invite(owner_key, run_id, member.get_public_key(), OWNER_ROLE, get_dht_time() + seconds)
        self.admission = Admission(run_id, "invite", owner, member, invite)
        self.authorizer = InviteAuthorizer(member, invite, owner)

logger = logging.getLogger(__name__)


class Bootstrap:
    """A running bootstrap node: the DHT node and the keeper of the run's config record."""

    def __init__(self, node: SwarmNode, keeper: RunConfigKeeper, record: RunConfigRecord, scratch: str | None):
        self.node, self.keeper, self.record, self._scratch = node, keeper, record, scratch
        self.revocations: RevocationKeeper | None = None

    @classmethod
    def start(cls, run_id: str, config: dict[str, Any], version: str, *, initial_peers: Sequence[str] = (),
              host_maddrs: Sequence[str] = (), announce_maddrs: Sequence[str] = (),
              identity_path: Path | None = None, update_period: float = 15.0, owner: str | None = None,
              extra: dict[str, Any] | None = None, admission: str = "open") -> "Bootstrap":
        """Start the node, check the run's config (if the swarm already has one) and publish ours.

        :param owner: the run owner's peer id when joining a swarm another bootstrap owns (default: the first
          initial peer's; without initial peers this bootstrap owns the run)
        :param extra: the record's fields besides the config (tokenizer name, fingerprint and vocabulary)
        :param admission: ``open``, or ``invite``: only peers holding an invitation signed by the owner (this
          bootstrap's identity) may take part (``dht.admission``); this bootstrap then invites itself
        :raises NoInitialPeersError: ``initial_peers`` given but none answered
        :raises RunConfigMismatch: joining a swarm whose run has another config hash
        """
        scratch = None
        if identity_path is None:  # an RSA identity we can sign with, for this process only
            scratch = tempfile.mkdtemp(prefix="swarm-bootstrap-")
            identity_path = Path(scratch) / "bootstrap.id"
        try:
            fresh = not Path(identity_path).exists()
            key = load_or_create_identity(identity_path)
            me = peer_id_of(key.get_public_key())
            owner = run_owner(initial_peers, owner) if initial_peers or owner else me
            member = member_key(identity_path)
            if admission == "invite" and owner != me:
                raise ControlPlaneError("--admission invite: only the run's owner starts an invite-only run; join "
                                        "someone else's run with `swarm-peer join --invite ...`")
            access = SelfAdmission(key, member, run_id, owner) if admission == "invite" else None
            node = SwarmNode.start(run_id, initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
                                   identity_path=identity_path, fresh_identity=fresh, keys=[member],
                                   authorizer=access.authorizer if access else None)
        except BaseException:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        try:
            assert str(node.dht.peer_id) == me, (node.dht.peer_id, me)
            keeper = RunConfigKeeper(node, config, version, owner=owner, signer=key if owner == me else None,
                                     extra={**(extra or {}), "admission": admission}, update_period=update_period)
            record = keeper.start()
            boot = cls(node, keeper, record, scratch)
            if access is not None:
                boot.revocations = RevocationKeeper(node, access.admission, update_period).start()
        except BaseException:
            node.shutdown()
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        if owner == me:
            logger.info("this bootstrap owns run %s (%s admission): peers take its config only when signed by %s",
                        run_id, admission, me)
        return boot

    def initial_peers(self) -> list[str]:
        """The addresses to give to other peers."""
        return self.node.visible_maddrs()

    def lines(self) -> list[str]:
        """One copy-pasteable ``--initial-peers <multiaddr>`` line per visible address."""
        return [f"--initial-peers {maddr}" for maddr in self.initial_peers()]

    def summary(self) -> dict[str, Any]:
        return {"kind": "bootstrap", "run": self.node.run_id, "config_hash": self.record.hash,
                "initial_peers": self.initial_peers(), "peer_id": str(self.node.dht.peer_id),
                "run_owner": self.keeper.owner}

    def shutdown(self) -> None:
        if self.revocations is not None:
            self.revocations.stop()
        self.keeper.stop()
        self.node.shutdown()
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
