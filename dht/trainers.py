"""Trainers in the DHT: each trainer publishes its counters (:class:`TrainerAnnouncer`), the
inspector reads them (:func:`read_trainers`). Records live under ``{run}_trainers``, subkey the
trainer's owner key, and expire after three refresh periods; the final DONE record stays for
``DONE_TTL_S`` (the inspector shows recently finished trainers with their final counters).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable

import pydantic
from hivemind.utils.timed_storage import get_dht_time

from dht.announce import EXPIRY_PERIODS, Refresher, store_value
from dht.keys import trainers_key
from dht.node import SwarmNode
from dht.records import MAX_LIFETIME, TrainerRecord
from dht.signing import key_id, owner_subkey

logger = logging.getLogger(__name__)
DONE_TTL_S = 300.0


class TrainerAnnouncer:
    """Publishes ``counters()`` (the fields of a :class:`TrainerRecord` that change) every ``update_period``.

    :param counters: ``() -> dict``, read on every write; it must be cheap and thread-safe enough for a snapshot
    """

    def __init__(self, node: SwarmNode, trainer_id: str, version: str, counters: Callable[[], dict[str, Any]],
                 update_period: float):
        self.node, self.counters, self.update_period = node, counters, update_period
        self.trainer_id, self.version = trainer_id, version
        self.subkey = owner_subkey(node.key)
        self._lock = threading.Lock()
        self._refresher = Refresher(self._write, update_period, name="announce-trainer")

    def start(self) -> TrainerAnnouncer:
        self._refresher.last_ok = self._write()
        self._refresher.start()
        return self

    def stop(self, final: dict[str, Any]) -> bool:
        """Stop refreshing and write the final counters (state DONE), kept for ``DONE_TTL_S``."""
        self._refresher.stop()
        return self._write({**final, "state": "DONE"}, ttl=max(DONE_TTL_S, self.update_period * EXPIRY_PERIODS))

    def _write(self, fields: dict[str, Any] | None = None, ttl: float | None = None) -> bool:
        with self._lock:
            try:
                now = get_dht_time()
                record = TrainerRecord(trainer_id=self.trainer_id, version=self.version, updated_at=now,
                                       update_period=float(self.update_period), **(fields or self.counters()))
            except (pydantic.ValidationError, RuntimeError) as e:  # a counter out of range: skip this refresh
                logger.debug("trainer record not written: %s", e)
                return False
            return store_value(self.node, trainers_key(self.node.run_id), self.subkey, record.to_dht(),
                               now + (ttl if ttl is not None else self.update_period * EXPIRY_PERIODS))


@dataclasses.dataclass(frozen=True)
class SeenTrainer:
    owner: str
    record: TrainerRecord
    expires_at: float


def read_trainers(node: SwarmNode, timeout: float = 30.0) -> list[SeenTrainer]:
    """The run's trainers whose records have not expired (unreadable or zombie records skipped)."""
    found = node.dht.get(trainers_key(node.run_id), latest=True, return_future=True).result(timeout=timeout)
    if found is None or not isinstance(found.value, dict):
        return []
    now, out = get_dht_time(), []
    for subkey, item in found.value.items():
        if not now < item.expiration_time <= now + MAX_LIFETIME:
            continue
        try:
            out.append(SeenTrainer(key_id(subkey), TrainerRecord.model_validate(item.value), item.expiration_time))
        except pydantic.ValidationError as e:
            logger.debug("skipping an unreadable trainer record: %s", e)
    return sorted(out, key=lambda t: t.record.trainer_id)
