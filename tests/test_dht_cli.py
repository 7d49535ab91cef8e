"""`swarm-peer bootstrap` and `swarm-peer inspect` as real processes against real localhost DHTs."""

import json
import signal
import subprocess
import time

import pytest
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from conftest import BIN
from dht.announce import Announcer, new_peer_record
from dht.owner import peer_id_of
from dht.records import config_hash
from dht.runconfig import RunConfigKeeper
from dht.signing import key_id, owner_subkey
from dht.testing import FakePeers
from peer.config import load_config

LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
SWARM_PEER = str(BIN / "swarm-peer")


def swarm_peer(*args, timeout=90):
    return subprocess.run([SWARM_PEER, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def initial_peer_lines(text: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("--initial-peers ")]


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_bootstrap_prints_initial_peers_publishes_the_config_and_stops_on_sigterm(spawn, tmp_path, run_id):
    identity = tmp_path / "bootstrap.id"
    args = [SWARM_PEER, "bootstrap", *LOOPBACK, "--identity-path", identity, "--run-id", run_id,
            "--preset", "tiny", "--stages", "3", "--update-period", "5"]
    boot = spawn(args)
    [addr] = initial_peer_lines(boot.wait_for_stdout(initial_peer_lines))
    maddr = Multiaddr(addr)
    assert maddr["ip4"] == "127.0.0.1" and maddr["p2p"]

    snap = json.loads(swarm_peer("inspect", "--initial-peers", addr, "--run-id", run_id, "--json").stdout)
    expected = load_config({"preset": "tiny", "stages": 3, "run_id": run_id}).shared()
    assert snap["config_hash"] == config_hash(expected) and snap["num_stages"] == 3 and snap["peers"] == 0
    assert "stage 0 has no online peer" in snap["warnings"]

    mismatch = swarm_peer("bootstrap", *LOOPBACK, "--initial-peers", addr, "--run-id", run_id,
                          "--preset", "tiny", "--stages", "4")
    assert_one_line_error(mismatch, config_hash(expected), config_hash({**expected, "stages": 4}),
                          "stages: 4 (here) != 3 (run)")

    assert boot.stop(signal.SIGTERM) == 0
    assert "Traceback" not in boot.stderr and "shutting down" in boot.stderr

    again = spawn(args)  # the same identity file: the same peer id, so the printed line stays valid
    [addr2] = initial_peer_lines(again.wait_for_stdout(initial_peer_lines))
    assert Multiaddr(addr2)["p2p"] == maddr["p2p"]
    snap = json.loads(swarm_peer("inspect", "--initial-peers", addr2, "--run-id", run_id, "--json").stdout)
    assert snap["config_hash"] == config_hash(expected)  # and it still owns the run: its record is the run's
    assert not any("signed by its owner" in w for w in snap["warnings"]), snap["warnings"]
    assert again.stop(signal.SIGINT) == 0


@pytest.mark.slow
def test_inspect_json_lists_exactly_the_announced_peers(dht_swarm, run_id):
    cfg = load_config({"preset": "tiny", "stages": 3})
    owner_key = RSAPrivateKey()
    owner = peer_id_of(owner_key.get_public_key())
    with RunConfigKeeper(dht_swarm.nodes[0], cfg.shared(), "0.1.0", owner=owner, signer=owner_key,
                         update_period=60.0) as run, \
            FakePeers(dht_swarm.initial_peers, run_id, num_stages=3, per_stage=2, version="0.1.0",
                      fingerprint=run.local.hash) as fakes:
        extra = dht_swarm.nodes[1]
        newcomer = Announcer(extra, new_peer_record(2, "0.2.0", run.local.hash, endpoint="127.0.0.1:29999",
                                                    throughput=99.0, public_name="newcomer"), update_period=60.0)
        newcomer.start()
        fakes.announcers[0].stop()  # fake peer 0 of stage 0 leaves (OFFLINE): it must not be listed

        proc = swarm_peer("inspect", "--initial-peers", dht_swarm.initial_peers[0], "--run-id", run_id, "--json",
                          "--run-owner", owner)
        assert proc.returncode == 0, proc.stderr
        snap = json.loads(proc.stdout)
        assert snap["run"] == run_id and snap["config_hash"] == run.local.hash and snap["num_stages"] == 3
        listed = {p["peer_id"]: (s["stage"], p) for s in snap["stages"] for p in s["peers"]}
        expected = {key_id(owner_subkey(k)) for k in fakes.keys[1:]} | {key_id(owner_subkey(extra.key))}
        assert set(listed) == expected and snap["peers"] == len(expected) == 6
        assert listed[key_id(owner_subkey(extra.key))][0] == 2
        joining = listed[key_id(owner_subkey(extra.key))][1]
        assert (joining["state"], joining["endpoint"], joining["version"]) == ("JOINING", "127.0.0.1:29999", "0.2.0")
        one = listed[key_id(owner_subkey(fakes.keys[1]))][1]
        assert (one["state"], one["throughput"], one["queue"], one["inflight"]) == ("ONLINE", 11.0, 0, 0)
        assert 0 <= one["age_s"] < 60 and 100 < one["expires_in_s"] <= 180

        totals = [s["throughput"] for s in snap["stages"]]
        assert totals == [11.0, 20.0 + 21.0, 30.0 + 31.0]  # ONLINE peers only; the JOINING newcomer does not count
        assert snap["bottleneck"] == 0
        assert any("different versions: 0.1.0 (5), 0.2.0 (1)" in w for w in snap["warnings"])

        table = swarm_peer("inspect", "--initial-peers", dht_swarm.initial_peers[0], "--run-id", run_id,
                           "--run-owner", owner)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert any(line.startswith("stage 0:") and "<- bottleneck" in line for line in lines)
        assert sum(key_id(owner_subkey(k)) in table.stdout for k in fakes.keys[1:]) == 5
        assert "PEER" in table.stdout and "SAMPLES/S" in table.stdout and "newcomer" in table.stdout
        newcomer.stop()


@pytest.mark.slow
def test_inspect_watch_refreshes_until_interrupted(spawn, dht_swarm, run_id):
    watch = spawn([SWARM_PEER, "inspect", "--initial-peers", dht_swarm.initial_peers[0], "--run-id", run_id,
                   "--stages", "2", "--watch", "0.3", "--json"])
    text = watch.wait_for_stdout(lambda out: len(out.splitlines()) >= 2)
    snaps = [json.loads(line) for line in text.splitlines()]
    assert all(s["run"] == run_id and s["num_stages"] == 2 and s["config_hash"] is None for s in snaps)
    assert "no config record" in snaps[0]["warnings"][0]
    assert watch.stop(signal.SIGINT) == 0


@pytest.mark.slow
def test_inspect_without_an_answering_peer_is_one_clear_line(run_id):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDAqZCqKgtMdZuGgcWxCzLHHPMKcJBZShyfDDqjWPTiYj"
    assert_one_line_error(swarm_peer("inspect", "--initial-peers", dead, "--run-id", run_id),
                          "none of the initial peers answered", dead)
    assert_one_line_error(swarm_peer("inspect", "--initial-peers", "127.0.0.1:9"), "bad initial peer address")
    assert_one_line_error(swarm_peer("inspect"), "needs --initial-peers")


@pytest.mark.slow
def test_inspect_shows_the_trainers_counters_and_the_dht_refuses_bad_trainer_records(dht_swarm, run_id):
    from dht.keys import trainers_key
    from dht.trainers import TrainerAnnouncer

    node = dht_swarm.nodes[1]
    counters = {"state": "TRAINING", "steps": 7, "microbatches_sent": 30, "microbatches_done": 28, "retries": 3,
                "failures": 1, "bans": 2, "waits": 4, "recoveries": 1, "max_recovery_s": 2.5, "tokens_per_s": 900.0,
                "loss": 6.25}
    trainer = TrainerAnnouncer(node, "trainer-0-abc123", "0.1.0", lambda: dict(counters), update_period=60.0).start()
    assert trainer._refresher.last_ok
    # a value of the wrong shape under a trainer's subkey is refused by the storing nodes' schema
    bad = node.dht.store(trainers_key(run_id), {"trainer_id": "x", "steps": "many"}, expiration_time=time.time() + 60,
                         subkey=owner_subkey(node.key), return_future=True).result(timeout=10)
    assert not bad

    snap = json.loads(swarm_peer("inspect", "--initial-peers", dht_swarm.initial_peers[0], "--run-id", run_id,
                                 "--stages", "1", "--json").stdout)
    (seen,) = snap["trainers"]
    assert seen["owner"] == key_id(owner_subkey(node.key)) and seen["trainer_id"] == "trainer-0-abc123"
    assert {k: seen[k] for k in counters} == counters and seen["lost"] == 0

    assert trainer.stop({**counters, "steps": 8, "lost": 2})
    snap = json.loads(swarm_peer("inspect", "--initial-peers", dht_swarm.initial_peers[0], "--run-id", run_id,
                                 "--stages", "1", "--json").stdout)
    (seen,) = snap["trainers"]
    assert (seen["state"], seen["steps"], seen["lost"]) == ("DONE", 8, 2)
    assert any("trainer trainer-0-abc123 lost 2 microbatches" in w for w in snap["warnings"])
    table = swarm_peer("inspect", "--initial-peers", dht_swarm.initial_peers[0], "--run-id", run_id, "--stages", "1")
    assert "trainers: 1" in table.stdout and "RETRIES" in table.stdout and "trainer-0-abc123" in table.stdout
