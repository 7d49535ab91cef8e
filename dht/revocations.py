"""Revoked invitations of an invite-only run: the owner's signed lists under ``{run}_revoked`` (``dht.admission``).

:func:`publish_revocation` (``swarm-peer revoke``) adds ids to the newest list and stores it signed
by the owner. :class:`RevocationKeeper` (every node of an invite-only run) reads the newest list
every update period, hands it to this node's checks (its DHT authorizer and its hop gate), and
republishes it unchanged under its own subkey, so that the list outlives the command that wrote it.
"""

from __future__ import annotations

import logging
from typing import Iterable

from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from dht.admission import Admission, newest_revocation, set_revoked, sign_revocation
from dht.announce import EXPIRY_PERIODS, Refresher, store_value
from dht.keys import revoked_key
from dht.node import SwarmNode
from dht.records import MAX_LIFETIME, RevocationRecord

logger = logging.getLogger(__name__)


def read_revocation(node: SwarmNode, owner: str, timeout: float = 10.0) -> RevocationRecord | None:
    """The newest revocation list of the run signed by ``owner`` (None: nothing revoked, or the read failed)."""
    try:
        found = node.dht.get(revoked_key(node.run_id), latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:  # the DHT did not answer: the caller keeps what it knew
        logger.debug("reading the revoked invitations failed: %s", e)
        return None
    return newest_revocation(found, node.run_id, owner)


def publish_revocation(node: SwarmNode, owner_key: RSAPrivateKey, owner: str, ids: Iterable[str]) -> RevocationRecord:
    """Store the run's newest revocation list plus ``ids``, signed by the owner, under this node's subkey.

    :raises RuntimeError: no DHT node accepted it
    """
    known = read_revocation(node, owner)
    record = sign_revocation(owner_key, node.run_id, {*(known.ids if known else ()), *ids})
    if not store_value(node, revoked_key(node.run_id), node.owner_subkey, record.to_dht(),
                       get_dht_time() + MAX_LIFETIME - 60):
        raise RuntimeError("no DHT node accepted the revocation list")
    return record


class RevocationKeeper:
    """Keeps this node's view of the revoked invitations current, and the newest list published."""

    def __init__(self, node: SwarmNode, admission: Admission, update_period: float):
        self.node, self.admission, self.update_period = node, admission, update_period
        self.record: RevocationRecord | None = None
        self._told = False
        self._refresher = Refresher(self.refresh, update_period, name="revocations")

    def start(self) -> "RevocationKeeper":
        self.refresh()
        self._refresher.start()
        return self

    def refresh(self) -> bool:
        newest = read_revocation(self.node, self.admission.owner)
        if newest is not None and (self.record is None or newest.published_at > self.record.published_at):
            self.record = newest
            self.admission.revoked = frozenset(newest.ids)
            set_revoked(self.node.dht, newest.ids)
            logger.info("run %s: %d invitation(s) revoked", self.node.run_id, len(newest.ids))
        problem = self.admission.own_problem()
        if problem and not self._told:
            logger.error("this peer's invitation no longer admits it to run %s: %s; the run's peers refuse its "
                         "calls", self.node.run_id, problem)
        self._told = bool(problem)
        if self.record is None:
            return True
        return store_value(self.node, revoked_key(self.node.run_id), self.node.owner_subkey, self.record.to_dht(),
                           get_dht_time() + EXPIRY_PERIODS * self.update_period)

    def stop(self) -> None:
        self._refresher.stop()
