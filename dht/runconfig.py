"""``{run}_config``: the run's shared model/training config and its hash, signed by the run's owner.

The run's owner (``swarm-peer bootstrap``, see :mod:`dht.owner`) publishes it, signed with its
identity key; every peer that joins takes only a record signed by the owner, checks its own config
against it and refuses to join on a different hash (:class:`~dht.errors.RunConfigMismatch`, with
both hashes and the fields that differ). Peers that match keep publishing the owner's record,
unchanged, under their own subkeys, so the record outlives the node that started the run. Records
that anyone else signed (or nobody did) are ignored with a warning.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from dht.announce import DEFAULT_UPDATE_PERIOD, EXPIRY_PERIODS, Refresher, store_value, stored_records
from dht.errors import ControlPlaneError, RunConfigMismatch
from dht.keys import config_key
from dht.node import SwarmNode
from dht.owner import owner_problem, peer_id_of, sign_record
from dht.records import RunConfigRecord, config_diff
from dht.signing import key_id

logger = logging.getLogger(__name__)
FETCH_ATTEMPTS = 3  # a joiner that finds no owner's record asks again (a record stored a moment ago may be missed)


class NoRunConfig(ControlPlaneError):
    """The run's owner has published no config record that this peer can find."""


def fetch_run_config(node: SwarmNode, owner: str, timeout: float = 30.0) -> RunConfigRecord | None:
    """The run's config record signed by ``owner`` (a peer id), or None if there is none.

    Records signed by anyone else, or whose hash does not match their content, are ignored with a warning.
    """
    found = node.dht.get(config_key(node.run_id), latest=True, return_future=True).result(timeout=timeout)
    records = []
    for subkey, stored, record in stored_records(found, RunConfigRecord):
        if record.run != node.run_id or not record.verified():
            logger.warning("ignoring a config record of publisher %s whose hash does not match its content",
                           key_id(subkey))
            continue
        problem = owner_problem(record, owner, stored)
        if problem:
            logger.warning("ignoring a config record of publisher %s (config %s): %s (%s)", key_id(subkey),
                           record.hash, problem, owner)
            continue
        records.append(record)
    if not records:
        return None
    records.sort(key=lambda r: (r.published_at, r.hash))
    chosen = records[0]
    others = sorted({r.hash for r in records} - {chosen.hash})
    if others:  # the owner published several (restarted with another config): its first one stands
        logger.warning("run %s has conflicting config records of its owner (%s); using the oldest, %s",
                       node.run_id, ", ".join(others), chosen.hash)
    return chosen


def find_run_config(node: SwarmNode, owner: str, timeout: float = 30.0) -> RunConfigRecord:
    """:func:`fetch_run_config`, asked again a few times while there is none (a record stored a moment ago).

    :raises NoRunConfig: the owner published none that we can find
    """
    for attempt in range(FETCH_ATTEMPTS):
        record = fetch_run_config(node, owner, timeout)
        if record is not None:
            return record
        if attempt + 1 < FETCH_ATTEMPTS:
            time.sleep(1.0 + attempt)
    raise NoRunConfig(
        f"no config record of run {node.run_id!r} signed by its owner {owner}: is the first --initial-peers address "
        f"the bootstrap's (its line ends in /p2p/<owner>)? Reaching the swarm through another peer, also pass "
        f"--run-owner <the bootstrap's peer id>. (A clock far ahead of the swarm's hides every record too: hivemind's "
        f"records expire by wall-clock time.)")


def check_run_config(ours: RunConfigRecord, theirs: RunConfigRecord | None) -> None:
    """Refuse a peer whose config differs from the run's.

    :raises RunConfigMismatch: showing both hashes and the fields that differ
    """
    if theirs is None or theirs.hash == ours.hash:
        return
    diff = config_diff(ours.config, theirs.config)
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    raise RunConfigMismatch(
        f"run {ours.run!r} was started with config hash {theirs.hash}, but this peer's config hashes to "
        f"{ours.hash} ({shown}); use the run's settings or another --run-id",
        ours=ours.hash, theirs=theirs.hash,
    )


class RunConfigKeeper:
    """Checks this peer's config against the run's, then keeps the owner's record published under its own subkey.

    :param node: the DHT node of this peer
    :param config: the flat shared config of this peer (see ``peer.config.shared_run_config``)
    :param version: swarm-peer version
    :param owner: the run owner's peer id
    :param signer: the owner's identity key, when this peer is the owner (it publishes the run's record if the run
      has none yet)
    :param extra: fields of the record the owner sets besides the config (the tokenizer's name, fingerprint, vocab)
    :param update_period: refresh period; the record expires after ``EXPIRY_PERIODS`` of them
    """

    def __init__(self, node: SwarmNode, config: dict[str, Any], version: str, *, owner: str,
                 signer: RSAPrivateKey | None = None, extra: dict[str, Any] | None = None,
                 update_period: float = DEFAULT_UPDATE_PERIOD):
        if signer is not None and peer_id_of(signer.get_public_key()) != owner:
            raise ValueError("the signer's key is not the owner's")
        self.node, self.update_period, self.owner, self.signer = node, update_period, owner, signer
        self.local = RunConfigRecord.create(node.run_id, config, version, published_at=get_dht_time(),
                                            **(extra or {}))
        self.record: RunConfigRecord | None = None
        self._refresher = Refresher(self._write, update_period, name="run-config")

    def start(self, timeout: float = 30.0, known: RunConfigRecord | None = None) -> RunConfigRecord:
        """Fetch the owner's record; raise on a mismatch; publish (and keep publishing) it.

        :param known: the owner's record, already fetched by the caller (not read again)
        :returns: the run's record (ours, signed, if we own the run and it had none)
        :raises RunConfigMismatch: the run has another hash
        :raises NoRunConfig: we do not own the run and its owner published nothing we can find
        """
        if known is not None:
            existing = known
        elif self.signer is None:
            existing = find_run_config(self.node, self.owner, timeout)
        else:
            existing = fetch_run_config(self.node, self.owner, timeout)
        check_run_config(self.local, existing)
        # Republish the original publication time so that "oldest wins" keeps pointing at the same record.
        self.record = existing or sign_record(self.local, self.signer)
        if existing is None:
            logger.info("publishing the config of run %s (hash %s)", self.node.run_id, self.local.hash)
        if not self._write():
            logger.warning("no DHT node accepted the config record of run %s yet; retrying", self.node.run_id)
        self._refresher.start()
        return self.record

    def _write(self) -> bool:
        now = get_dht_time()
        value = self.record.to_dht()
        return store_value(self.node, config_key(self.node.run_id), self.node.owner_subkey, value,
                           now + EXPIRY_PERIODS * self.update_period)

    def stop(self) -> None:
        self._refresher.stop()

    def __enter__(self) -> "RunConfigKeeper":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
