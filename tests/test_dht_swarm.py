"""Peer records on a real localhost DHT: announce, read, state changes, expiry, OFFLINE on shutdown,
and the storing nodes refusing forged and malformed records from a hostile client."""

import time

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from dht.announce import Announcer, new_peer_record
from dht.keys import stage_key
from dht.peers import live_peers, read_stages, routable_peers
from dht.records import PeerState
from dht.signing import key_id, owner_subkey
from swarm_fixtures import stored_records
from waiting import wait_until


def test_announce_is_read_from_another_node_and_state_changes_are_immediate(dht_swarm):
    writer, reader = dht_swarm.nodes[1], dht_swarm.nodes[0]
    record = new_peer_record(1, "0.1.0", "f" * 16, endpoint="127.0.0.1:5001", throughput=42.0, public_name="alice")
    with Announcer(writer, record, update_period=60.0) as ann:  # a long period: only the immediate write can explain
        peers = live_peers(reader, 2)
        assert peers[0] == []
        [peer] = peers[1]
        assert peer.peer_id == key_id(owner_subkey(writer.key))
        assert (peer.record.state, peer.record.endpoint, peer.record.throughput) == \
            (PeerState.JOINING, "127.0.0.1:5001", 42.0)
        assert not peer.routable and routable_peers(reader, 2)[1] == []
        assert 170 < peer.expires_in_s() <= 180  # 3 periods

        ann.update(state=PeerState.ONLINE)
        [peer] = wait_until(lambda: routable_peers(reader, 2)[1], timeout=5)
        assert peer.record.state == PeerState.ONLINE and peer.routable

        ann.update(queue=4, inflight=2)  # load figures go out with the next refresh, or on demand
        assert ann.write_now()
        assert live_peers(reader, 2)[1][0].record.queue == 4


def test_offline_on_stop_drops_the_peer_at_once(dht_swarm):
    writer, reader = dht_swarm.nodes[1], dht_swarm.nodes[0]
    ann = Announcer(writer, new_peer_record(0, "0.1.0", state=PeerState.ONLINE, endpoint="h:1"), update_period=60.0)
    ann.start()
    assert len(live_peers(reader, 1)[0]) == 1
    assert ann.stop()
    assert live_peers(reader, 1)[0] == []  # long before the 180 s expiry
    [gone] = read_stages(reader, [0])[0]
    assert gone.record.state == PeerState.OFFLINE


def test_records_expire_unless_refreshed(dht_swarm):
    reader = dht_swarm.nodes[0]
    keys = [RSAPrivateKey(), RSAPrivateKey()]
    node = dht_swarm.add_node(keys=keys)
    period = 0.5  # expiry after 3 periods = 1.5 s
    alive = Announcer(node, new_peer_record(0, "0.1.0", public_name="alive"), update_period=period,
                      key=keys[0]).start()
    crashed = Announcer(node, new_peer_record(0, "0.1.0", public_name="crashed"), update_period=period,
                        key=keys[1]).start()
    first_expiry = {p.record.public_name: p.expires_at for p in live_peers(reader, 1)[0]}
    assert set(first_expiry) == {"alive", "crashed"}
    crashed.abandon()  # no OFFLINE write: as if the process died

    def names() -> list[str]:
        return [p.record.public_name for p in live_peers(reader, 1)[0]]

    wait_until(lambda: names() == ["alive"], timeout=3 * period + 10, what="the crashed peer's record expiring")
    # and the live one's record is refreshed past its first expiry, not merely younger than the crashed one's
    wait_until(lambda: any(p.expires_at > first_expiry["alive"] for p in live_peers(reader, 1)[0]
                           if p.record.public_name == "alive"), timeout=10, what="the live record refreshed")
    assert names() == ["alive"]
    alive.stop()


def test_moving_to_another_stage_leaves_the_old_one_at_once(dht_swarm):
    writer, reader = dht_swarm.nodes[1], dht_swarm.nodes[0]
    with Announcer(writer, new_peer_record(0, "0.1.0", state=PeerState.ONLINE, endpoint="h:1"),
                   update_period=60.0) as ann:
        ann.update(stage=2)
        peers = wait_until(lambda: (lambda p: p if not p[0] and p[2] else None)(live_peers(reader, 3)))
        assert peers[2][0].record.stage == 2 and peers[1] == []


def test_forged_and_malformed_records_are_refused_by_the_storing_nodes(dht_swarm):
    victim_node, reader = dht_swarm.nodes[1], dht_swarm.nodes[0]
    key = stage_key(dht_swarm.run_id, 0)
    record = new_peer_record(0, "0.1.0", state=PeerState.ONLINE, endpoint="127.0.0.1:5000", throughput=10.0)
    expiration = time.time() + 60
    victim = owner_subkey(victim_node.key)
    with Announcer(victim_node, record, update_period=60.0):
        forged = {**record.to_dht(), "endpoint": "127.0.0.1:6666"}  # redirect the victim's traffic
        stock = hivemind.DHT(initial_peers=dht_swarm.initial_peers, start=True, client_mode=True,
                             host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # stock hivemind: no validators of ours
        own_key = RSAPrivateKey()
        signer = hivemind.DHT(initial_peers=dht_swarm.initial_peers, start=True, client_mode=True,
                              host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[RSASignatureValidator(own_key)])
        try:
            assert not stock.store(key, forged, expiration, subkey=victim)  # unsigned overwrite
            assert not signer.store(key, forged, expiration, subkey=victim)  # signed with the wrong key
            assert not stock.store(key, {"state": "ONLINE"}, expiration, subkey=b"junk")  # no owner key, bad record
            mine = owner_subkey(own_key)
            assert not signer.store(key, {**record.to_dht(), "throughput": "fast"}, expiration, subkey=mine)
            assert not signer.store(key, {**record.to_dht(), "stage": -1}, expiration, subkey=mine)
            assert not stock.store(key, None, expiration + 1e6)  # a plain value that would block the key
            assert signer.store(key, record.to_dht(), expiration, subkey=mine)  # its own well-formed record: fine

            for node in dht_swarm.nodes:
                stored = stored_records(node, key)
                assert set(stored) <= {victim, mine}
                assert stored[victim]["endpoint"] == "127.0.0.1:5000"
            endpoints = {p.peer_id: p.record.endpoint for p in live_peers(reader, 1)[0]}
            assert endpoints == {key_id(victim): "127.0.0.1:5000", key_id(mine): "127.0.0.1:5000"}
        finally:
            stock.shutdown()
            signer.shutdown()


def test_no_answer_from_initial_peers_is_a_clear_error(run_id):
    from dht.errors import NoInitialPeersError
    from dht.node import SwarmNode

    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDAqZCqKgtMdZuGgcWxCzLHHPMKcJBZShyfDDqjWPTiYj"
    with pytest.raises(NoInitialPeersError, match="none of the initial peers answered"):
        SwarmNode.start(run_id, [dead], wait_timeout=1.0)
    with pytest.raises(NoInitialPeersError, match="bad initial peer address 'localhost:9'"):
        SwarmNode.start(run_id, ["localhost:9"])


def test_an_announcer_needs_a_key_its_node_can_sign_with(dht_swarm):
    record = new_peer_record(0, "0.1.0")
    with pytest.raises(ValueError, match="cannot sign for this key"):
        Announcer(dht_swarm.nodes[0], record, key=RSAPrivateKey())


@pytest.mark.slow
def test_a_peer_process_stopped_by_sigterm_or_sigint_leaves_offline(spawn, dht_swarm):
    import signal
    import sys

    reader = dht_swarm.nodes[0]
    for sig in (signal.SIGTERM, signal.SIGINT):
        peer = spawn([sys.executable, "-m", "dht.testing", "--initial-peers", dht_swarm.initial_peers[0],
                      "--run-id", dht_swarm.run_id, "--stage", "1", "--update-period", "60"])
        peer_id = peer.wait_for_stdout(lambda out: out.strip()).strip()
        assert [p.peer_id for p in live_peers(reader, 2)[1]] == [peer_id]
        assert peer.stop(sig) == 0
        assert live_peers(reader, 2)[1] == []  # at once, not after the 180 s expiry
        assert {p.peer_id: p.record.state for p in read_stages(reader, [1])[1]}[peer_id] == PeerState.OFFLINE
