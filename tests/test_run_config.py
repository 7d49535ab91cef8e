"""The ``{run}_config`` record: published and signed by the run's owner, checked by every joiner."""

import json
import subprocess
import time
import types

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from dht.errors import ControlPlaneError, RunConfigMismatch
from dht.keys import config_key
from dht.owner import owner_problem, peer_id_of, run_owner, sign_record
from dht.records import RunConfigRecord
from dht.runconfig import NoRunConfig, RunConfigKeeper, check_run_config, fetch_run_config, find_run_config
from dht.signing import owner_subkey
from conftest import BIN
from peer.config import load_config
from peer.errors import ConfigError
from peer.session import adopt, check_tokenizer, run_vocab

OWNER_KEY = RSAPrivateKey()
OWNER = peer_id_of(OWNER_KEY.get_public_key())


def shared(**overrides):
    return load_config({"preset": "tiny", "stages": 2, **overrides}).shared()


def owned(node, config, **kwargs):
    """The keeper of the run's owner."""
    return RunConfigKeeper(node, config, "0.1.0", owner=OWNER, signer=OWNER_KEY, update_period=60.0, **kwargs)


def joining(node, config):
    return RunConfigKeeper(node, config, "0.1.0", owner=OWNER, update_period=60.0)


def stranger_stores(initial_peers, run_id, record: RunConfigRecord, key: RSAPrivateKey) -> None:
    """A peer with its own (valid) DHT key stores ``record`` under its own subkey."""
    dht = hivemind.DHT(initial_peers=initial_peers, start=True, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       record_validators=[RSASignatureValidator(key)])
    try:
        assert dht.store(config_key(run_id), record.to_dht(), time.time() + 60, subkey=owner_subkey(key))
    finally:
        dht.shutdown()


def test_published_config_is_read_back_and_a_matching_joiner_is_accepted(dht_swarm):
    starter, joiner = dht_swarm.nodes
    assert fetch_run_config(joiner, OWNER) is None
    with owned(starter, shared()) as first:
        assert first.record.hash == first.local.hash and first.record.owner_key  # nobody had published: ours, signed
        seen = fetch_run_config(joiner, OWNER)
        assert seen is not None and seen.hash == first.local.hash and seen.config == shared()
        with joining(joiner, shared()) as second:
            assert second.record == first.record  # it republishes the owner's record, signature and all
    # both keep it alive under their own subkeys, so the record outlives its first publisher


def test_a_peer_with_another_config_is_refused_with_both_hashes(dht_swarm):
    starter, joiner = dht_swarm.nodes
    with owned(starter, shared()) as run:
        other = joining(joiner, shared(lr=1e-3))
        with pytest.raises(RunConfigMismatch) as err:
            other.start()
        message = str(err.value)
        assert run.local.hash in message and other.local.hash in message
        assert "lr: 0.001 (here) != 0.0006 (run)" in message
        assert (err.value.ours, err.value.theirs) == (other.local.hash, run.local.hash)
        assert fetch_run_config(starter, OWNER).hash == run.local.hash  # the refused peer published nothing


def test_check_run_config_accepts_no_record_and_the_same_config_and_refuses_another():
    ours = RunConfigRecord.create("r", shared(), "0.1.0")
    assert check_run_config(ours, None) is None  # the owner, first in its run: nothing to compare with
    same = RunConfigRecord.create("r", shared(), "0.1.0")  # another record (its own time), the same config
    assert same.hash == ours.hash and check_run_config(ours, same) is None
    with pytest.raises(RunConfigMismatch, match=r"lr: 0\.001 \(here\) != 0\.0006 \(run\)"):
        check_run_config(RunConfigRecord.create("r", shared(lr=1e-3), "0.1.0"), ours)


def test_a_record_whose_hash_does_not_match_its_content_is_ignored(dht_swarm):
    """A hostile peer with its own (valid) key cannot pass off another config under the run's hash."""
    starter, reader = dht_swarm.nodes
    with owned(starter, shared()) as run:
        fake = run.record.model_copy(update={"config": shared(stages=3), "published_at": 1.0})
        stranger_stores(dht_swarm.initial_peers, dht_swarm.run_id, fake, RSAPrivateKey())
        seen = fetch_run_config(reader, OWNER)
        assert seen.hash == run.local.hash and seen.config["stages"] == 2


def test_a_strangers_older_config_is_ignored_and_the_owners_is_used(dht_swarm, caplog):
    """The attack: a record published "earlier" (lower published_at) with another lr and a local file as dataset,
    unsigned or signed by the stranger's own key. Joiners take the owner's record, and no record, not even the
    owner's, makes a peer read a local file or a Hub repository it did not name."""
    starter, reader = dht_swarm.nodes
    stranger = RSAPrivateKey()
    evil = {**shared(lr=1.0), "dataset": "/etc/hostname", "tokenizer": "attacker/tokenizer"}
    with owned(starter, {**shared(), "dataset": "/etc/hostname"}) as run:
        unsigned = RunConfigRecord.create(dht_swarm.run_id, evil, "0.1.0", published_at=1.0, vocab=300)
        for record in (unsigned, sign_record(unsigned.model_copy(update={"published_at": 2.0}), stranger)):
            stranger_stores(dht_swarm.initial_peers, dht_swarm.run_id, record, RSAPrivateKey())
        with caplog.at_level("WARNING", logger="dht.runconfig"):
            seen = find_run_config(reader, OWNER)
        assert seen.hash == run.record.hash and seen.config["lr"] == 6e-4
        assert "it is not signed" in caplog.text and f"it is signed by {peer_id_of(stranger.get_public_key())}" in \
            caplog.text
        # a stranger's id is not the owner's: the same records are the run's only for someone who names the stranger
        assert fetch_run_config(reader, peer_id_of(stranger.get_public_key())).config["lr"] == 1.0
    cfg = adopt(load_config({}), seen.config)
    assert cfg.optim.lr == 6e-4 and cfg.data.dataset == "shakespeare" and cfg.data.tokenizer == "bpe"


def test_a_joiner_without_the_owners_record_is_told_what_to_check(dht_swarm):
    starter, joiner = dht_swarm.nodes
    with owned(starter, shared()):  # the run has a record, but not of the owner this joiner names
        other_owner = peer_id_of(RSAPrivateKey().get_public_key())
        with pytest.raises(NoRunConfig, match=f"signed by its owner {other_owner}.*--run-owner"):
            find_run_config(joiner, other_owner, timeout=5)


def test_a_signature_covers_every_field_and_only_the_owners_key_passes():
    record = sign_record(RunConfigRecord.create("r", shared(), "0.1.0", vocab=512, tokenizer_fingerprint="ab"),
                         OWNER_KEY)
    assert owner_problem(record, OWNER) is None
    for change in ({"vocab": 300}, {"published_at": 1.0}, {"tokenizer_fingerprint": "cd"}, {"run": "other"}):
        assert owner_problem(record.model_copy(update=change), OWNER) == "its signature does not match its content"
    stored = {**record.to_dht(), "field_of_a_newer_version": 1}  # a stored field this reader does not know
    assert owner_problem(record, OWNER, stored) == "its signature does not match its content"
    assert owner_problem(record.model_copy(update={"signature": ""}), OWNER) == "it is not signed"
    assert owner_problem(record.model_copy(update={"owner_key": "ssh-rsa AAAA"}), OWNER) == "its key is malformed"


def test_the_owner_is_the_first_initial_peer_unless_named():
    first = "/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    second = "/ip4/127.0.0.1/tcp/2/p2p/12D3KooWKTN8tFqbDXeix2A6M17CdH9jp1zAmpVcnVWQbR7xfr1w"
    assert run_owner([first, second]) == "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    assert run_owner([second], OWNER) == OWNER
    with pytest.raises(ControlPlaneError, match="--run-owner 'not-an-id': expected a libp2p peer id"):
        run_owner([first], "not-an-id")


def test_a_trainer_whose_tokenizer_is_not_the_runs_is_refused_naming_both():
    record = RunConfigRecord.create("r", shared(), "0.1.0", tokenizer="bpe-8192", tokenizer_fingerprint="aaaa",
                                    vocab=8192)
    cfg = load_config({"dataset": "mine.txt"})
    check_tokenizer(record, types.SimpleNamespace(name="bpe-8192", fingerprint="aaaa"), cfg)  # the same: fine
    with pytest.raises(ConfigError, match=r"\(bpe-8192, fingerprint bbbb, from --dataset mine\.txt.*fingerprint aaaa"):
        check_tokenizer(record, types.SimpleNamespace(name="bpe-8192", fingerprint="bbbb"), cfg)
    assert run_vocab(record, cfg) == 8192
    with pytest.raises(ConfigError, match="does not say the model's vocabulary size"):
        run_vocab(record.model_copy(update={"vocab": 0}), cfg)


@pytest.mark.slow
def test_train_on_other_data_than_the_owners_exits_with_one_line(spawn, tmp_path, run_id):
    """The owner's bootstrap trained its bpe on the default corpus; a trainer with its own text file would
    tokenize it with another vocabulary: refused before it sends anything."""
    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(f"paragraph {i} of a corpus not the run's, with words {i * 7}" for i in range(400)))
    boot = spawn([str(BIN / "swarm-peer"), "bootstrap", "--run-id", run_id, "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                  "--json", "--preset", "tiny", "--vocab-size", "300"])
    initial = json.loads(boot.wait_for_stdout(lambda out: out.strip(), timeout=120).splitlines()[0])["initial_peers"][0]
    proc = subprocess.run([str(BIN / "swarm-peer"), "train", "--run-id", run_id, "--initial-peers", initial,
                           "--dataset", str(text), "--run-dir", str(tmp_path / "run"), "--cache-dir",
                           str(tmp_path / "cache")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "this trainer's tokenizer (bpe-300" in last and f"--dataset {text}" in last and "is not the run's" in last
