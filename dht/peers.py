"""Reading the swarm: the peers of each stage as typed objects.

:func:`read_stages` returns every well-formed record per stage (OFFLINE ones included,
for the inspector's counts); :func:`live_peers` keeps the ones a router may consider
(not OFFLINE, not expired); :attr:`LivePeer.routable` says whether it takes work now.
Reads use ``latest=True`` so a reader's local cache never hides a newly joined peer.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Iterable

from hivemind.utils.timed_storage import get_dht_time

from dht.keys import stage_key
from dht.node import SwarmNode
from dht.announce import stored_records
from dht.records import LIVE_STATES, ROUTABLE_STATES, PeerRecord
from dht.signing import key_id

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LivePeer:
    """One peer's record as read from the DHT.

    :param peer_id: short id of the owner key (:func:`dht.signing.key_id`): unforgeable, unique per peer
    :param subkey: the owner subkey the record is stored under
    :param record: the parsed record
    :param expires_at: DHT time at which the record expires unless refreshed
    """

    peer_id: str
    subkey: bytes
    record: PeerRecord
    expires_at: float

    @property
    def stage(self) -> int:
        return self.record.stage

    @property
    def routable(self) -> bool:
        """ONLINE with an endpoint: a router may send it work."""
        return self.record.state in ROUTABLE_STATES and bool(self.record.endpoint)

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the peer started."""
        return max(0.0, (get_dht_time() if now is None else now) - self.record.started_at)

    def expires_in_s(self, now: float | None = None) -> float:
        return self.expires_at - (get_dht_time() if now is None else now)

    def stale(self, now: float | None = None) -> bool:
        """Missed at least one refresh: more than 1.5 update periods since its last write."""
        now = get_dht_time() if now is None else now
        return now - self.record.updated_at > 1.5 * self.record.update_period


def _parse_stage(stage: int, found) -> list[LivePeer]:
    out = [LivePeer(key_id(subkey), subkey, record, found.value[subkey].expiration_time)
           for subkey, _, record in stored_records(found, PeerRecord)
           if record.stage == stage]  # stored under another stage's key: not to be trusted
    return sorted(out, key=lambda p: (p.record.started_at, p.peer_id))


def read_stages(node: SwarmNode, stages: Iterable[int], timeout: float = 30.0) -> dict[int, list[LivePeer]]:
    """Every readable record of each stage, OFFLINE included (all stages are read in parallel).

    :raises TimeoutError: the DHT did not answer within ``timeout`` seconds
    """
    stages = list(stages)
    futures = {k: node.dht.get(stage_key(node.run_id, k), latest=True, return_future=True) for k in stages}
    deadline = get_dht_time() + timeout
    out = {}
    for k, future in futures.items():
        try:
            found = future.result(timeout=max(0.1, deadline - get_dht_time()))
        except FutureTimeout:
            for other in futures.values():
                other.cancel()
            raise TimeoutError(f"the DHT did not answer within {timeout:.0f} s") from None
        out[k] = _parse_stage(k, found)
    return out


def live_peers(node: SwarmNode, num_stages: int, timeout: float = 30.0) -> dict[int, list[LivePeer]]:
    """The peers of stages ``0..num_stages-1`` that are JOINING, ONLINE or DRAINING and not expired."""
    now = get_dht_time()
    return {k: [p for p in peers if p.record.state in LIVE_STATES and p.expires_at > now]
            for k, peers in read_stages(node, range(num_stages), timeout).items()}


def routable_peers(node: SwarmNode, num_stages: int, timeout: float = 30.0) -> dict[int, list[LivePeer]]:
    """The peers of each stage that take work now (ONLINE with an endpoint)."""
    return {k: [p for p in peers if p.routable] for k, peers in live_peers(node, num_stages, timeout).items()}
