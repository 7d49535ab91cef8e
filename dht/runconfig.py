"""``{run}_config``: the run's shared model/training config and its hash.

Whoever starts the run (usually ``swarm-peer bootstrap``) publishes it under its own owner
subkey; every peer that joins checks its own config against it and refuses to join on a
different hash (:class:`~dht.errors.RunConfigMismatch`, with both hashes and the fields
that differ). Peers that match keep publishing the same record under their own subkeys,
so the record outlives the node that started the run. When several verified records
disagree, the oldest publication wins.
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic
from hivemind.utils.timed_storage import get_dht_time

from dht.announce import DEFAULT_UPDATE_PERIOD, EXPIRY_PERIODS, Refresher, store_value
from dht.errors import RunConfigMismatch
from dht.keys import config_key
from dht.node import SwarmNode
from dht.records import MAX_LIFETIME, RunConfigRecord, config_diff
from dht.signing import key_id

logger = logging.getLogger(__name__)


def fetch_run_config(node: SwarmNode, timeout: float = 30.0) -> RunConfigRecord | None:
    """The run's config record (the oldest verified publication), or None if nobody published one."""
    found = node.dht.get(config_key(node.run_id), latest=True, return_future=True).result(timeout=timeout)
    if found is None or not isinstance(found.value, dict):
        return None
    records, latest_allowed = [], get_dht_time() + MAX_LIFETIME
    for subkey, item in found.value.items():
        if item.expiration_time > latest_allowed:
            continue
        try:
            record = RunConfigRecord.model_validate(item.value)
        except pydantic.ValidationError:
            continue
        if record.run != node.run_id or not record.verified():
            logger.warning("ignoring a config record of publisher %s whose hash does not match its content",
                           key_id(subkey))
            continue
        records.append(record)
    if not records:
        return None
    records.sort(key=lambda r: (r.published_at, r.hash))
    chosen = records[0]
    others = sorted({r.hash for r in records} - {chosen.hash})
    if others:
        logger.warning("run %s has conflicting config records (%s); using the oldest, %s",
                       node.run_id, ", ".join(others), chosen.hash)
    return chosen


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
    """Checks this peer's config against the run's, then keeps the (same) record published under its own subkey.

    :param node: the DHT node of this peer
    :param config: the flat shared config of this peer (see ``peer.config.shared_run_config``)
    :param version: swarm-peer version
    :param update_period: refresh period; the record expires after ``EXPIRY_PERIODS`` of them
    """

    def __init__(self, node: SwarmNode, config: dict[str, Any], version: str,
                 update_period: float = DEFAULT_UPDATE_PERIOD):
        self.node, self.update_period = node, update_period
        self.local = RunConfigRecord.create(node.run_id, config, version, published_at=get_dht_time())
        self.record: RunConfigRecord | None = None
        self._refresher = Refresher(self._write, update_period, name="run-config")

    def start(self, timeout: float = 30.0) -> RunConfigRecord:
        """Fetch the run's record; raise on a mismatch; publish (and keep publishing) ours.

        :returns: the run's record (ours, if we are the first)
        :raises RunConfigMismatch: the run has another hash
        """
        existing = fetch_run_config(self.node, timeout)
        check_run_config(self.local, existing)
        # Republish the original publication time so that "oldest wins" keeps pointing at the same record.
        self.record = existing or self.local
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
