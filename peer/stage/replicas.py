"""What one replica of a stage knows about the others: every DHT read the stage's averaging relies on.

Only the stage's signed records say who its replicas are (:class:`Mate`: the key id, owner subkey and DHT peer
id of a live stage record), and everything else a replica reads is taken from them alone:

* who averages: the stage's other live replicas (their stage records, JOINING excluded) that also have
  an averager declared in the collaboration, so that a record with no averager behind it (a hung or
  forged peer) does not make every round wait for it;
* progress: hivemind's progress records count only when signed by a replica's key (the tracker filters them
  with :meth:`ReplicaView.progress_subkeys`), so a stranger cannot move the stage's epoch or its sample count;
* state downloads: only from a replica's DHT peer id (:meth:`ReplicaView.donor_peer_ids`);
* the donor: among this peer and its live replicas, the one whose id hashes lowest with the epoch, whose state
  the others reload when theirs is off (per epoch: a key ground to win once wins nothing after);
* digests: each replica publishes, per parameter tensor, the sum of squares of its parameters with its
  epoch, in a signed, schema-checked record under ``{run}_digests_{k}``; a replica whose digest differs from
  the donor's at the same epoch is apart from it.

The reads block (a DHT lookup each), so :meth:`ReplicaView.refresh` runs off the serving loop; the
other methods answer from what the last refresh saw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math

import torch

from dht.keys import digests_key
from dht.records import DigestRecord

logger = logging.getLogger(__name__)
DHT_READ_TIMEOUT_S = 5.0
FRESH_READ_TIMEOUT_S = 0.5  # a read the compute worker waits for (see others_samples): no answer, no late gradients
DIGEST_TTL_S = 60.0  # a replica's published parameter digest expires after this (refreshed after every step)
DIGEST_RTOL = 1e-6  # rounding moves a tensor's sum of squares by ~1e-9 relative; one step apart, by far more


@dataclasses.dataclass(frozen=True)
class Mate:
    """Another live replica of the stage, as its signed stage record names it."""

    peer_id: str  # the record owner's key id
    subkey: bytes = b""  # the owner subkey of its records (stage, digests, hivemind progress)
    dht_peer_id: str = ""  # the libp2p id of its DHT node, which its averagers share


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


def donor_rank(peer_id: str, epoch: int) -> bytes:
    """The donor of an epoch is the replica with the lowest rank: a hash of its id and the epoch."""
    return hashlib.sha256(f"{peer_id}|{epoch}".encode()).digest()


class ReplicaView:
    """The other replicas of stage ``stage`` as replica ``me`` sees them.

    :param dht: the peer's hivemind DHT
    :param mates: ``() -> list[Mate]``, the other live peers of this stage (JOINING excluded)
    :param averagers_key: the DHT key under which the collaboration's state averagers are declared
    :param my_averager: this peer's averager id (bytes), not counted among the others
    :param progress_key: the DHT key of the collaboration's progress records (hivemind's ``ProgressTracker``)
    :param my_subkey: the owner subkey this replica signs its digest and progress records with
    """

    def __init__(self, dht, run_id: str, stage: int, me: str, mates, averagers_key: str, my_averager: bytes,
                 progress_key: str = "", my_subkey: bytes = b""):
        self.dht, self.stage, self.me, self._mates = dht, stage, me, mates
        self._averagers_key, self._my_averager, self._progress_key = averagers_key, my_averager, progress_key
        self._digest_key, self._my_subkey = digests_key(run_id, stage), my_subkey
        self.averagers = 0  # other declared averagers, as of the last refresh
        self.apart_at: int | None = None  # our epoch, if the donor's digest at that epoch differs from ours
        self._mine: tuple[int, list[float]] | None = None  # our last published (epoch, digest)

    def mates(self) -> int:
        """How many other live peers serve this stage (from their stage records)."""
        return len(self._mates())

    def progress_subkeys(self) -> set[bytes]:
        """The subkeys whose progress records count: this replica's and its live stage-mates'."""
        return {self._my_subkey, *(m.subkey for m in self._mates() if m.subkey)}

    def donor_peer_ids(self) -> set[str]:
        """The DHT peer ids a state download may come from: the live stage-mates'."""
        return {m.dht_peer_id for m in self._mates() if m.dht_peer_id}

    def replicas(self) -> int:
        """How many other replicas to average with: live stage-mates that also take part in the collaboration.

        Not from the collaboration's progress records: a stage-mate that has not processed a microbatch yet
        publishes none, and a peer that stepped alone on that view would leave its mate waiting for a group."""
        return min(self.mates(), self.averagers)

    def alone(self) -> bool:
        return self.replicas() == 0

    def donor(self, epoch: int | None = None) -> Mate | None:
        """The donor at ``epoch`` (default: ours as last published) among this peer and its live stage-mates;
        None when it is this peer."""
        epoch = (self._mine[0] if self._mine else 0) if epoch is None else epoch
        me = Mate(self.me, self._my_subkey)
        best = min([me, *self._mates()], key=lambda m: (donor_rank(m.peer_id, epoch), m.peer_id))
        return None if best.peer_id == self.me else best

    def is_donor(self, epoch: int | None = None) -> bool:
        return self.donor(epoch) is None

    def diverged(self, epoch: int) -> bool:
        """The donor's parameters at ``epoch`` (ours) differed from ours at the last :meth:`refresh`."""
        return self.apart_at is not None and self.apart_at == epoch and not self.is_donor(epoch)

    def forget_apart(self) -> None:
        """After a reload: compare with the donor afresh at the next refresh."""
        self.apart_at = None

    def publish(self, epoch: int, module: torch.nn.Module) -> None:
        """Publish this replica's epoch and digest (after every step, resync and load)."""
        from hivemind.utils import get_dht_time  # hivemind only once a peer averages

        self._mine = (epoch, digest(module))
        value = DigestRecord(epoch=epoch, digest=self._mine[1]).to_dht()
        self.dht.store(self._digest_key, subkey=self._my_subkey, value=value,
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
        most ``FRESH_READ_TIMEOUT_S`` for it); None if the read failed. Records not signed by a stage-mate's key
        count for nothing."""
        try:
            found = read.result(timeout=FRESH_READ_TIMEOUT_S)
        except TimeoutError:
            logger.debug("stage %d: progress read timed out", self.stage)
            return None
        if found is None or not isinstance(found.value, dict):
            return None
        total, mates = 0, {m.subkey for m in self._mates()}
        for subkey, entry in found.value.items():
            record = getattr(entry, "value", None)
            if subkey not in mates or not isinstance(record, dict) or record.get("peer_id") == self._my_averager:
                continue
            e, n = record.get("epoch"), record.get("samples_accumulated")
            if type(e) is int and type(n) is int and e == epoch and n > 0:
                total += n
        return total

    def _apart_from_donor(self) -> int | None:
        mine = self._mine
        donor = self.donor(mine[0]) if mine else None
        if donor is None or not donor.subkey:
            return None
        found = self._get(self._digest_key)
        entry = found.value.get(donor.subkey) if found is not None and isinstance(found.value, dict) else None
        try:
            theirs = DigestRecord.model_validate(entry.value) if entry is not None else None
        except Exception:  # pydantic's ValidationError, or a value of another type: the storing nodes' schema
            theirs = None  # refuses these, so only an old or broken node serves one
        my_epoch, my_digest = mine
        if theirs is None or theirs.epoch != my_epoch or same_digest(my_digest, theirs.digest):
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
