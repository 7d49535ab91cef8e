"""TLS for the data plane: a stage server with --tls-cert/--tls-key serves TLS only, dialers that find its certificate's
hash in its record reach it pinned to exactly that certificate, a certificate other than the pinned one fails the hop
(and its router bans the peer), and plaintext callers get nowhere. Real gRPC stage servers on 127.0.0.1, certificates
made here with `cryptography`."""

from __future__ import annotations

import datetime
import hashlib
import logging
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peer.errors import ConfigError
from peer.rpc import tls
from peer.rpc.client import HopFailed, StageClient, StaticNextHop
from peer.rpc.tensors import WireError
from stage_helpers import fresh_stages, run_async, send, tokens

V, T, B = 512, 16, 2


def make_cert(directory, name="swarm-peer", days=30, starts_in_days=0, encrypt=False):
    """A self-signed P-256 certificate for ``name`` and its key, written as ``{name}.pem`` and ``{name}.key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=starts_in_days, minutes=-5)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    encryption = serialization.BestAvailableEncryption(b"secret") if encrypt else serialization.NoEncryption()
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    return {name: make_cert(directory, name) for name in ("stage0", "stage1", "stranger")}


@pytest.fixture(scope="module")
def chain(certs):
    """Two TLS stages: stage 0 reaches stage 1 pinned to its certificate (as a router would from its record)."""
    from peer.stage.runtime import StageRuntime, StageSpec
    from peer.stage.server import StageServer

    stages = fresh_stages("tiny", V, T, 2)
    identities = [tls.load_server_tls(*certs[f"stage{k}"][:2]) for k in range(2)]
    servers = []
    try:
        for k in (1, 0):
            spec = StageSpec("test-run", k, 2, stages[0].config.hidden_size, V)
            following = servers[0] if servers else None
            next_hop = StaticNextHop([following.address], pins={following.address: identities[1].sha256}) \
                if following else None
            servers.insert(0, StageServer(StageRuntime(stages[k], spec), next_hop, tls=identities[k]).start())
        yield servers, identities
    finally:
        for server in servers:
            server.stop(grace=2)


def test_loading_a_certificate_and_key_says_what_is_wrong(tmp_path, certs):
    cert, key, sha256 = certs["stage0"]
    loaded = tls.load_server_tls(cert, key)
    assert loaded.sha256 == sha256 and len(sha256) == 64
    with pytest.raises(ConfigError, match=r"--tls-cert .*missing\.pem: cannot read it"):
        tls.load_server_tls(tmp_path / "missing.pem", key)
    with pytest.raises(ConfigError, match=r"--tls-key .*cannot read it"):
        tls.load_server_tls(cert, tmp_path / "missing.key")
    (tmp_path / "junk.pem").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"--tls-cert .*junk\.pem: not a usable PEM certificate"):
        tls.load_server_tls(tmp_path / "junk.pem", key)
    with pytest.raises(ConfigError, match=r"--tls-key .*stranger\.key does not belong to --tls-cert .*stage0\.pem"):
        tls.load_server_tls(cert, certs["stranger"][1])
    locked = make_cert(tmp_path, "locked", encrypt=True)
    with pytest.raises(ConfigError, match="does not belong to --tls-cert .* or is not an unencrypted PEM private key"):
        tls.load_server_tls(*locked[:2])
    expired = make_cert(tmp_path, "expired", days=1, starts_in_days=-3)
    with pytest.raises(ConfigError, match=r"--tls-cert .*expired\.pem: valid only from .* UTC; make a new one"):
        tls.load_server_tls(*expired[:2])


def test_a_config_takes_a_certificate_and_its_key_or_neither(certs):
    from peer.config import load_config

    cert, key, _ = certs["stage0"]
    cfg = load_config({"tls_cert": str(cert), "tls_key": str(key)})
    assert (cfg.peer.tls_cert, cfg.peer.tls_key) == (cert, key)
    assert load_config({}).peer.tls_cert is None
    with pytest.raises(ConfigError, match="--tls-cert needs --tls-key too"):
        load_config({"tls_cert": str(cert)})
    with pytest.raises(ConfigError, match="--tls-key needs --tls-cert too"):
        load_config({"tls_key": str(key)})


def test_a_pinned_route_through_tls_stages_trains(chain):
    servers, identities = chain
    x, y = tokens(V, B, T)
    outcome = send(StaticNextHop([servers[0].address], pins={servers[0].address: identities[0].sha256}), x, y,
                   max_attempts=1)
    assert outcome.result.loss > 0 and outcome.retries == 0
    assert servers[1].servicer.counters["ok"] >= 1  # stage 0 reached stage 1 over its pinned channel


def test_a_certificate_other_than_the_pinned_one_fails_the_hop(chain, certs, caplog):
    servers, _ = chain
    address = servers[0].address
    wrong = StaticNextHop([address], pins={address: certs["stranger"][2]})
    served = servers[0].servicer.counters["hops"]
    with caplog.at_level(logging.WARNING, logger="peer.rpc.tls"), pytest.raises(HopFailed) as failed:
        send(wrong, *tokens(V, B, T), max_attempts=1)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and "is not the pinned" in str(failed.value)
    assert wrong.failures == {address: 1}  # reported as a failed hop
    assert any(address in r.getMessage() and "record pins" in r.getMessage() for r in caplog.records)
    assert servers[0].servicer.counters["hops"] == served  # nothing was sent to it


def test_a_router_bans_a_peer_whose_certificate_is_not_its_record_s(chain, certs):
    from dht.peers import LivePeer
    from dht.records import PeerRecord, PeerState
    from peer.swarm.directory import Directory, StageRouter

    servers, identities = chain
    address = servers[0].address
    now = time.time()

    def peer(name: str, pin: str) -> LivePeer:
        record = PeerRecord(state=PeerState.ONLINE, stage=0, endpoint=address, throughput=10.0, version="t",
                            started_at=now, updated_at=now, tls_sha256=pin)
        return LivePeer(name, name.encode(), record, now + 60)

    impostor = Directory(lambda: {0: [peer("impostor", certs["stranger"][2])]}, 1)
    impostor.refresh()
    router = StageRouter(impostor, 0, seed=0)
    with pytest.raises(HopFailed):
        send(router, *tokens(V, B, T), max_attempts=1)
    assert router.pin(address) == certs["stranger"][2] and router.bans == 1

    honest = Directory(lambda: {0: [peer("honest", identities[0].sha256)]}, 1)
    honest.refresh()
    router = StageRouter(honest, 0, seed=0)
    assert send(router, *tokens(V, B, T), max_attempts=1).result.loss > 0 and router.bans == 0

    # an impostor's record naming an honest peer's address costs that address nothing: its false pin bans the
    # impostor's record, not the address, so the honest record there is chosen next
    listing = [peer("impostor", certs["stranger"][2])]
    both = Directory(lambda: {0: list(listing)}, 1)
    both.refresh()
    router = StageRouter(both, 0, seed=0)
    with pytest.raises(HopFailed):
        send(router, *tokens(V, B, T), max_attempts=1)
    listing.append(peer("honest", identities[0].sha256))
    both.refresh()
    assert router.endpoint_stats[address].banned_until == 0.0 and router.stats["impostor"].banned_until > time.time()
    assert send(router, *tokens(V, B, T), max_attempts=1).result.loss > 0
    assert router.stats["honest"].successes == 1 and router.bans == 1


def test_plaintext_callers_get_nowhere_but_the_health_check_works(chain):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from peer.health import check

    servers, _ = chain
    address = servers[0].address
    with pytest.raises(HopFailed) as failed:
        send(address, *tokens(V, B, T), max_attempts=1)  # no pin: plaintext
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert check(address, timeout=5).status == "SERVING"  # `swarm-peer health` (the Docker HEALTHCHECK)


def test_a_client_makes_a_new_channel_when_a_peer_s_pin_changes(chain, certs):
    servers, identities = chain
    address = servers[1].address

    async def go():
        client = StageClient()
        try:
            reply = await client.info(address, pin=identities[1].sha256)
            first = client._stubs[address]
            assert reply.stage == 1 and first[3] == identities[1].sha256
            assert (await client.info(address, pin=identities[1].sha256)).stage == 1
            assert client._stubs[address] is first  # the same pin: the cached channel
            with pytest.raises(WireError, match="is not the pinned"):
                await client.info(address, pin=certs["stranger"][2])
            with pytest.raises(grpc.aio.AioRpcError):
                await client.info(address)  # no pin any more: a new plaintext channel, refused
            assert client._stubs[address][3] is None and len(client._stubs) == 1
        finally:
            await client.close()

    run_async(go(), timeout=60)
