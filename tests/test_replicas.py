"""What a replica reads about its stage-mates from the DHT: records that may be lies count for nothing."""

from __future__ import annotations

import types

from peer.stage.replicas import Mate, ReplicaView, donor_rank, same_digest

ME = b"my-averager"


class Read:
    """A finished DHT read (what ``dht.get(..., return_future=True)`` resolves to): ``{subkey: entry}``."""

    def __init__(self, records: dict | None):
        self.records = records

    def result(self, timeout=None):
        if self.records is None:
            return None
        return types.SimpleNamespace(value={k: types.SimpleNamespace(value=v) for k, v in self.records.items()})


MATES = [Mate("b", "k1"), Mate("c", "k2"), Mate("d", "k4"), Mate("e", "e")]


def view() -> ReplicaView:
    return ReplicaView(dht=None, run_id="r", stage=0, me="a", mates=lambda: MATES, averagers_key="k",
                       my_averager=ME)


def progress(peer: bytes, epoch, samples) -> dict:
    return {"peer_id": peer, "epoch": epoch, "samples_accumulated": samples, "samples_per_second": 1.0, "time": 0.0,
            "client_mode": False}


def test_others_samples_counts_the_other_replicas_at_our_epoch():
    records = {"k1": progress(b"b", 3, 8), "k2": progress(b"c", 3, 4), "k3": progress(ME, 3, 16),
               "k4": progress(b"d", 2, 30)}  # ours is counted by the caller; an old epoch's is not this batch
    assert view().others_samples(Read(records), 3) == 12


def test_progress_of_a_peer_without_a_stage_record_counts_for_nothing():
    """A stranger (any key may write under hivemind's progress key) cannot complete the stage's batch."""
    records = {"k1": progress(b"b", 3, 8), "stranger": progress(b"x", 3, 1000)}
    assert view().others_samples(Read(records), 3) == 8
    assert view().progress_subkeys() == {b"", "k1", "k2", "k4", "e"}  # ours (none here) and the mates'


def test_the_donor_is_drawn_per_epoch_so_a_ground_id_wins_once_at_most():
    replicas = view()
    donors = {epoch: (replicas.donor(epoch) or Mate("a")).peer_id for epoch in range(200)}
    ids = ["a", "b", "c", "d", "e"]
    for epoch, chosen in donors.items():
        assert chosen == min(ids, key=lambda i: donor_rank(i, epoch))
    assert set(donors.values()) == set(ids)  # every replica is the donor of some epochs, none of all
    assert all(replicas.is_donor(e) == (donors[e] == "a") for e in range(200))


def test_malformed_progress_records_count_for_nothing():
    records = {"k1": progress(b"b", 3, 8), "k2": progress(b"c", "3", 4), "k4": progress(b"d", 3, 2.5),
               "e": progress(b"e", 3, -40)}  # the mates' subkeys: each record but the first is malformed
    assert view().others_samples(Read(records), 3) == 8
    records = {"k1": progress(b"b", 3, 8), "k2": "not a record", "k4": None, "e": progress(b"f", True, 4)}
    assert view().others_samples(Read(records), 3) == 8
    assert view().others_samples(Read(None), 3) is None  # nothing read: the caller files nothing as late


def test_digests_compare_as_lists_of_floats():
    assert same_digest([1.0, 2.0], [1.0, 2.0 + 1e-9])
    assert not same_digest([1.0, 2.0], [1.0, 2.1])
    assert not same_digest([1.0, 2.0], [1.0])
    assert not same_digest([1.0, 2.0], [1.0, "2.0"])


class SlowDHT:
    """A DHT whose reads answer ``records`` or, with ``records`` None, time out."""

    records: dict | None = None

    def get(self, key, latest=True, return_future=True):
        dht = self

        class Future:
            def result(self, timeout=None):
                if dht.records is None:
                    raise TimeoutError
                return Read(dht.records).result()

        return Future()


def test_a_failed_read_keeps_the_last_averager_count():
    """A slow DHT must not read as "no other averager": the replica would then step alone and drift apart."""
    dht = SlowDHT()
    replicas = ReplicaView(dht=dht, run_id="r", stage=0, me="a", mates=lambda: [Mate("b")], averagers_key="k",
                           my_averager=ME)
    dht.records = {ME: None, b"other": None}
    replicas.refresh()
    assert replicas.averagers == 1 and replicas.replicas() == 1
    dht.records = None
    replicas.refresh()
    assert replicas.declared_averagers() is None and replicas.replicas() == 1 and not replicas.alone()
    dht.records = {ME: None}  # the other's declaration is gone (it left): now alone
    replicas.refresh()
    assert replicas.alone()
