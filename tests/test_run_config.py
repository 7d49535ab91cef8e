"""The ``{run}_config`` record: published by whoever starts the run, checked by every joiner."""

import time

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from dht.errors import RunConfigMismatch
from dht.keys import config_key
from dht.records import RunConfigRecord
from dht.runconfig import RunConfigKeeper, check_run_config, fetch_run_config
from dht.signing import owner_subkey
from peer.config import load_config


def shared(**overrides):
    return load_config({"preset": "tiny", "stages": 2, **overrides}).shared()


def test_published_config_is_read_back_and_a_matching_joiner_is_accepted(dht_swarm):
    starter, joiner = dht_swarm.nodes
    assert fetch_run_config(joiner) is None
    with RunConfigKeeper(starter, shared(), "0.1.0", update_period=60.0) as first:
        assert first.record == first.local  # nobody had published: ours is the run's
        seen = fetch_run_config(joiner)
        assert seen is not None and seen.hash == first.local.hash and seen.config == shared()
        with RunConfigKeeper(joiner, shared(), "0.1.0", update_period=60.0) as second:
            assert second.record.hash == first.local.hash
            assert second.record.published_at == first.local.published_at  # it republishes the original
    # both keep it alive under their own subkeys, so the record outlives its first publisher


def test_a_peer_with_another_config_is_refused_with_both_hashes(dht_swarm):
    starter, joiner = dht_swarm.nodes
    with RunConfigKeeper(starter, shared(), "0.1.0", update_period=60.0) as run:
        other = RunConfigKeeper(joiner, shared(lr=1e-3), "0.1.0", update_period=60.0)
        with pytest.raises(RunConfigMismatch) as err:
            other.start()
        message = str(err.value)
        assert run.local.hash in message and other.local.hash in message
        assert "lr: 0.001 (here) != 0.0006 (run)" in message
        assert (err.value.ours, err.value.theirs) == (other.local.hash, run.local.hash)
        assert fetch_run_config(starter).hash == run.local.hash  # the refused peer published nothing


def test_check_run_config_accepts_no_record_and_the_same_config_and_refuses_another():
    ours = RunConfigRecord.create("r", shared(), "0.1.0")
    assert check_run_config(ours, None) is None  # the first peer of a run: nothing to compare with
    same = RunConfigRecord.create("r", shared(), "0.1.0")  # another record (its own time), the same config
    assert same.hash == ours.hash and check_run_config(ours, same) is None
    with pytest.raises(RunConfigMismatch, match=r"lr: 0\.001 \(here\) != 0\.0006 \(run\)"):
        check_run_config(RunConfigRecord.create("r", shared(lr=1e-3), "0.1.0"), ours)


def test_a_record_whose_hash_does_not_match_its_content_is_ignored(dht_swarm):
    """A hostile peer with its own (valid) key cannot pass off another config under the run's hash."""
    starter, reader = dht_swarm.nodes
    key = RSAPrivateKey()
    liar = hivemind.DHT(initial_peers=dht_swarm.initial_peers, start=True, client_mode=True,
                        host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[RSASignatureValidator(key)])
    try:
        with RunConfigKeeper(starter, shared(), "0.1.0", update_period=60.0) as run:
            fake = run.local.model_copy(update={"config": shared(stages=3), "published_at": 1.0}).to_dht()
            assert liar.store(config_key(dht_swarm.run_id), fake, time.time() + 60, subkey=owner_subkey(key))
            seen = fetch_run_config(reader)
            assert seen.hash == run.local.hash and seen.config["stages"] == 2
    finally:
        liar.shutdown()
