"""Keeping records alive: a peer's own record under ``{run}_stage_{k}``, refreshed every
``update_period`` and expiring after ``expiry_periods`` of them; written at once on every
state (or stage) change, and as OFFLINE on shutdown so readers drop the peer immediately.

Usage (a stage peer)::

    node = SwarmNode.start(run_id, initial_peers)
    with Announcer(node, new_peer_record(stage=2, version=__version__, fingerprint=h), update_period=15) as ann:
        ...                                   # load state, measure throughput
        ann.update(state=PeerState.ONLINE, endpoint="203.0.113.5:31338", throughput=412.0)  # written now
        ann.update(queue=3, inflight=5)       # written with the next refresh
    # leaving the block wrote OFFLINE
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator, TypeVar

import pydantic

from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from dht.keys import stage_key
from dht.node import SwarmNode
from dht.records import MAX_LIFETIME, PeerRecord, PeerState
from dht.signing import owner_subkey

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=pydantic.BaseModel)

DEFAULT_UPDATE_PERIOD = 15.0
EXPIRY_PERIODS = 3.0
IMMEDIATE_FIELDS = frozenset({"state", "stage", "endpoint"})
"""Changing one of these writes the record at once; other fields go out with the next refresh."""


def store_value(node: SwarmNode, key: str, subkey: bytes, value: dict[str, Any], expiration: float,
                timeout: float = 10.0) -> bool:
    """Store one signed subkey value; False (logged) if no node accepted it or the DHT did not answer in time."""
    try:
        future = node.dht.store(key, value, expiration_time=expiration, subkey=subkey, return_future=True)
        return bool(future.result(timeout=timeout))
    except Exception as e:  # the DHT process died or timed out: the caller retries on its next period
        logger.warning("storing %s failed: %s", key, e or type(e).__name__)
        return False


def stored_records(found, model: type[M]) -> Iterator[tuple[bytes, dict[str, Any], M]]:
    """``(subkey, stored dict, parsed record)`` for each entry of a DHT ``get`` result that parses as ``model``;
    entries that claim to expire later than any honest writer sets (a zombie), and unreadable ones (another
    layout, garbage), are skipped."""
    if found is None or not isinstance(found.value, dict):
        return
    latest_allowed = get_dht_time() + MAX_LIFETIME
    for subkey, item in found.value.items():
        if item.expiration_time > latest_allowed or not isinstance(item.value, dict):
            continue
        try:
            yield subkey, item.value, model.model_validate(item.value)
        except pydantic.ValidationError as e:
            logger.debug("skipping an unreadable %s: %s", model.__name__, e)


class Refresher:
    """A daemon thread that calls ``write()`` every ``period`` seconds, or at once after :meth:`poke`.

    The caller makes the first write itself (so it knows the record is out) before :meth:`start`.
    """

    def __init__(self, write: Callable[[], bool], period: float, name: str):
        self._write, self.period = write, period
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.last_ok: bool | None = None

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.period)
            if self._stopping.is_set():
                return
            self._wake.clear()
            ok = self._write()
            if not ok and self.last_ok is not False:
                logger.warning("%s: no DHT node accepted the record; retrying every %.0f s",
                               self._thread.name, self.period)
            self.last_ok = ok

def new_peer_record(stage: int, version: str, fingerprint: str = "", *, state: PeerState = PeerState.JOINING,
                    **fields: Any) -> PeerRecord:
    """A fresh record for a peer starting now (``started_at`` = ``updated_at`` = DHT time)."""
    now = get_dht_time()
    return PeerRecord(state=state, stage=stage, version=version, fingerprint=fingerprint, started_at=now,
                      updated_at=now, **fields)


class Announcer:
    """Publishes and refreshes one peer's record; thread-safe :meth:`update`.

    :param node: the DHT node to store through (it must be able to sign for ``key``)
    :param record: the initial record (its ``update_period`` and ``updated_at`` are managed here)
    :param update_period: seconds between refreshes
    :param expiry_periods: a record not refreshed for this many periods expires
    :param key: the owner key (default: the node's own key)
    """

    def __init__(self, node: SwarmNode, record: PeerRecord, *, update_period: float = DEFAULT_UPDATE_PERIOD,
                 expiry_periods: float = EXPIRY_PERIODS, key: RSAPrivateKey | None = None):
        self.node, self.update_period, self.expiry_periods = node, update_period, expiry_periods
        self.subkey = owner_subkey(key or node.key)
        if self.subkey not in {owner_subkey(k) for k in node.keys}:
            raise ValueError("the node cannot sign for this key: pass it to SwarmNode.start(keys=...)")
        self._lock = threading.Lock()
        self._record = record.model_copy(update={"update_period": float(update_period)})
        self._written_stage: int | None = None
        self._refresher = Refresher(self._write, update_period, name=f"announce-stage{record.stage}")

    @property
    def record(self) -> PeerRecord:
        with self._lock:
            return self._record

    def start(self) -> "Announcer":
        """Write the record now, then refresh it in the background."""
        self._refresher.last_ok = self._write()
        self._refresher.start()
        return self

    def update(self, **changes: Any) -> PeerRecord:
        """Change fields of the record (validated); state, stage or endpoint changes are written at once.

        :raises pydantic.ValidationError: a value the schema refuses
        """
        with self._lock:
            merged = {**self._record.model_dump(), **changes}
            new = PeerRecord.model_validate(merged)
            immediate = any(getattr(new, f) != getattr(self._record, f) for f in IMMEDIATE_FIELDS & changes.keys())
            self._record = new
        if immediate:
            self._refresher.poke()
        return new

    def write_now(self) -> bool:
        """Write the current record synchronously (the refresher keeps running)."""
        return self._write()

    def stop(self, state: PeerState = PeerState.OFFLINE) -> bool:
        """Stop refreshing and write a final record with ``state`` (OFFLINE: readers drop this peer at once).

        It keeps the usual expiry: hivemind keeps the value with the latest expiration, so a shorter
        one would be refused in favour of the last ONLINE record.
        """
        self._refresher.stop()
        with self._lock:
            self._record = self._record.model_copy(update={"state": state})
        return self._write()

    def abandon(self) -> None:
        """Stop refreshing without a final write, as if the peer crashed: the record expires on its own."""
        self._refresher.stop()

    def _write(self) -> bool:
        with self._lock:
            now = get_dht_time()
            record = self._record = self._record.model_copy(update={"updated_at": now})
            moved_from = self._written_stage if self._written_stage not in (None, record.stage) else None
            self._written_stage = record.stage
        expiration = now + self.update_period * self.expiry_periods
        if moved_from is not None:  # tell the old stage's readers at once that this peer left
            gone = record.model_copy(update={"state": PeerState.OFFLINE, "stage": moved_from})
            store_value(self.node, stage_key(self.node.run_id, moved_from), self.subkey, gone.to_dht(), expiration)
        ok = store_value(self.node, stage_key(self.node.run_id, record.stage), self.subkey, record.to_dht(),
                         expiration, timeout=min(30.0, max(10.0, self.update_period)))
        logger.debug("announced %s stage %d: %s", record.state.value, record.stage, "ok" if ok else "refused")
        return ok

    def __enter__(self) -> "Announcer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
