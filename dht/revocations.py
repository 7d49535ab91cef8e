"""Revoked invitations of an invite-only run: the owner's signed lists under ``{run}_revoked`` (``dht.admission``).

:func:`publish_revocation` (``swarm-peer revoke``) reads every list, adds ids to their union and stores
it signed by the owner, newer than all of them. :class:`RevocationKeeper` (every node of an invite-only
run) reads the lists every update period, hands the union of their ids to this node's checks (its DHT
authorizer and its hop gate; revoking only adds ids, so none is ever taken back), and republishes the
newest list unchanged under its own subkey, so that it outlives the command that wrote it.
"""

from __future__ import annotations

import logging
from typing import Iterable

from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from dht.admission import Admission, owner_revocations, set_revoked, sign_revocation
from dht.announce import EXPIRY_PERIODS, Refresher, store_value
from dht.keys import revoked_key
from dht.node import SwarmNode
from dht.records import MAX_LIFETIME, RevocationRecord

logger = logging.getLogger(__name__)


def read_revocations(node: SwarmNode, owner: str, timeout: float = 10.0) -> list[RevocationRecord]:
    """Every revocation list of the run signed by ``owner``, oldest first.

    :raises TimeoutError: the DHT did not answer
    """
    try:
        found = node.dht.get(revoked_key(node.run_id), latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:  # the DHT process failed or timed out
        raise TimeoutError(f"the DHT did not answer ({e or type(e).__name__})") from None
    return owner_revocations(found, node.run_id, owner)


def publish_revocation(node: SwarmNode, owner_key: RSAPrivateKey, owner: str, ids: Iterable[str]) -> RevocationRecord:
    """Store a revocation list of every id the run's lists hold plus ``ids``, signed by the owner and newer than
    any of them, under this node's subkey.

    :raises RuntimeError: the run's lists could not be read first (a list without them would shadow them), or no
      DHT node accepted the new one
    """
    try:
        known = read_revocations(node, owner)
    except TimeoutError as e:
        raise RuntimeError(f"could not read the run's revoked invitations first: {e}") from None
    newest = max((r.published_at for r in known), default=0.0)
    record = sign_revocation(owner_key, node.run_id, {*(i for r in known for i in r.ids), *ids},
                             published_at=max(get_dht_time(), newest + 1.0))
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
        try:
            lists = read_revocations(self.node, self.admission.owner)
        except TimeoutError as e:  # keep what we know; the next refresh reads again
            logger.debug("reading the revoked invitations failed: %s", e)
            lists = []
        revoked = self.admission.revoked.union(*(r.ids for r in lists))  # revoking only ever adds ids
        if revoked != self.admission.revoked:
            self.admission.revoked = frozenset(revoked)
            set_revoked(self.node.dht, revoked)
            logger.info("run %s: %d invitation(s) revoked", self.node.run_id, len(revoked))
        if lists and (self.record is None or lists[-1].published_at > self.record.published_at):
            self.record = lists[-1]  # the newest holds every earlier id (publish_revocation makes it so)
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
