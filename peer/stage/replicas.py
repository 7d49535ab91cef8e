"""What one replica of a stage knows about the others: every DHT read the stage's averaging relies on.

* who averages: the stage's other live replicas (their stage records, JOINING excluded) that also have
  an averager declared in the collaboration, so that a record with no averager behind it (a hung or
  forged peer) does not make every round wait for it;
* the donor: the live replica with the lowest id, whose state the others reload when theirs is off;
* digests: each replica publishes, per parameter tensor, the sum of squares of its parameters with its
  epoch; a replica whose digest differs from the donor's at the same epoch is apart from it.

The reads block (a DHT lookup each), so :meth:`ReplicaView.refresh` runs off the serving loop; the
other methods answer from what the last refresh saw.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)
DHT_READ_TIMEOUT_S = 5.0
FRESH_READ_TIMEOUT_S = 0.5  # a read the compute worker waits for (see others_samples): no answer, no late gradients
DIGEST_TTL_S = 60.0  # a replica's published parameter digest expires after this (refreshed after every step)
DIGEST_RTOL = 1e-6  # rounding moves a tensor's sum of squares by ~1e-9 relative; one step apart, by far more


@torch.no_grad()
def digest(module: torch.nn.Module) -> list[float]:
    """Per parameter tensor, the float64 sum of squares: equal across replicas up to the all-reduce's rounding,
    apart by far more after a step on different gradients (a round that lost a part)."""
    return [float(p.detach().double().pow(2).sum()) for p in module.parameters()]


def same_digest(mine: list[float], theirs: list) -> bool:
    """Whether a digest read from the DHT (a list of anything) matches ours."""
    return len(theirs) == len(mine) and all(
        isinstance(b, float) and math.isclose(a, b, rel_tol=DIGEST_RTOL, abs_tol=1e-12)
        for a, b in zip(mine, theirs, strict=True))


class ReplicaView:
    """The other replicas of stage ``stage`` as replica ``me`` sees them.

    :param dht: the peer's hivemind DHT
    :param mates: ``() -> list[str]``, the ids of the other live peers of this stage (JOINING excluded)
    :param averagers_key: the DHT key under which the collaboration's state averagers are declared
    :param my_averager: this peer's averager id (bytes), not counted among the others
    :param progress_key: the DHT key of the collaboration's progress records (hivemind's ``ProgressTracker``)
    """

    def __init__(self, dht, run_id: str, stage: int, me: str, mates, averagers_key: str, my_averager: bytes,
                 progress_key: str = ""):
        self.dht, self.stage, self.me, self._mates = dht, stage, me, mates
        self._averagers_key, self._my_averager, self._progress_key = averagers_key, my_averager, progress_key
        self._digest_key = f"{run_id}_stage{stage}_digests"
        self.averagers = 0  # other declared averagers, as of the last refresh
        self.apart_at: int | None = None  # our epoch, if the donor's digest at that epoch differs from ours
        self._mine: tuple[int, list[float]] | None = None  # our last published (epoch, digest)

    def mates(self) -> int:
        """How many other live peers serve this stage (from their stage records)."""
        return len(self._mates())

    def replicas(self) -> int:
        """How many other replicas to average with: live stage-mates that also take part in the collaboration.

        Not from the collaboration's progress records: a stage-mate that has not processed a microbatch yet
        publishes none, and a peer that stepped alone on that view would leave its mate waiting for a group."""
        return min(self.mates(), self.averagers)

    def alone(self) -> bool:
        return self.replicas() == 0

    def donor_id(self) -> str:
        """The lowest id among this peer and its live stage-mates."""
        return min([self.me, *self._mates()])

    def is_donor(self) -> bool:
        return self.donor_id() == self.me

    def diverged(self, epoch: int) -> bool:
        """The donor's parameters at ``epoch`` (ours) differed from ours at the last :meth:`refresh`."""
        return self.apart_at is not None and self.apart_at == epoch and not self.is_donor()

    def forget_apart(self) -> None:
        """After a reload: compare with the donor afresh at the next refresh."""
        self.apart_at = None

    def publish(self, epoch: int, module: torch.nn.Module) -> None:
        """Publish this replica's epoch and digest (after every step, resync and load)."""
        from hivemind.utils import get_dht_time  # hivemind only once a peer averages

        self._mine = (epoch, digest(module))
        self.dht.store(self._digest_key, subkey=self.me, value=[epoch, self._mine[1]],
                       expiration_time=get_dht_time() + DIGEST_TTL_S, return_future=True)

    def refresh(self) -> None:
        """The blocking reads: declared averagers, and whether we are apart from the donor. A read that fails keeps
        the last count: taking a slow DHT for "no other averager" would make this replica step alone."""
        declared = self.declared_averagers()
        if declared is not None:
            self.averagers = declared
        self.apart_at = self._apart_from_donor()

    def declared_averagers(self) -> int | None:
        """Averagers other than ours declared in the collaboration (sharing state or not: a replica whose state is
        off declares None, and still takes part in the rounds); None if the read failed."""
        found = self._get(self._averagers_key)
        if found is None:
            return None
        if not isinstance(found.value, dict):
            return 0
        return sum(1 for peer in found.value if peer != self._my_averager)

    def read_progress(self):
        """Start reading the collaboration's progress records (hivemind's ``ProgressTracker``); a future for
        :meth:`others_samples`."""
        return self.dht.get(self._progress_key, latest=True, return_future=True)

    def others_samples(self, read, epoch: int) -> int | None:
        """The samples the other replicas have reported for ``epoch``, from a :meth:`read_progress` (waiting at
        most ``FRESH_READ_TIMEOUT_S`` for it); None if the read failed."""
        try:
            found = read.result(timeout=FRESH_READ_TIMEOUT_S)
        except TimeoutError:
            logger.debug("stage %d: progress read timed out", self.stage)
            return None
        if found is None or not isinstance(found.value, dict):
            return None
        total = 0
        for entry in found.value.values():
            record = getattr(entry, "value", None)
            if not isinstance(record, dict) or record.get("peer_id") == self._my_averager:
                continue
            e, n = record.get("epoch"), record.get("samples_accumulated")
            if type(e) is int and type(n) is int and e == epoch and n > 0:
                total += n
        return total

    def _apart_from_donor(self) -> int | None:
        donor, mine = self.donor_id(), self._mine
        if donor == self.me or mine is None:
            return None
        found = self._get(self._digest_key)
        entry = found.value.get(donor) if found is not None and isinstance(found.value, dict) else None
        if entry is None or not isinstance(entry.value, list) or len(entry.value) != 2:
            return None
        (epoch, theirs), (my_epoch, my_digest) = entry.value, mine
        if epoch != my_epoch or not isinstance(theirs, list) or same_digest(my_digest, theirs):
            return None  # not comparable (yet), or equal
        logger.warning("stage %d: parameters differ from the donor's at epoch %d (a round that lost a part?): "
                       "reloading its state", self.stage, my_epoch)
        return my_epoch

    def _get(self, key: str, timeout: float = DHT_READ_TIMEOUT_S):
        """A DHT read that gives up after ``timeout`` seconds (None), so a slow DHT never stalls its caller."""
        try:
            return self.dht.get(key, latest=True, return_future=True).result(timeout=timeout)
        except TimeoutError:
            logger.debug("stage %d: DHT read of %s timed out", self.stage, key)
            return None
