"""The records and their storage schema (no network): one definition, strict on the storing nodes,
tolerant of fields that older or newer peers add or lack."""

import pytest

from dht.keys import config_key, digests_key, stage_key, trainers_key
from dht.records import DigestRecord, PeerRecord, PeerState, RunConfigRecord, config_diff, config_hash
from dht.schema import derive_v1, run_schema

NOW = 1_700_000_000.0


def record(**changes):
    fields = dict(state=PeerState.ONLINE, stage=1, endpoint="127.0.0.1:5000", throughput=12.5, version="0.1.0",
                  fingerprint="ab" * 8, started_at=NOW, updated_at=NOW)
    fields.update(changes)
    return PeerRecord(**fields).to_dht()


def test_keys_of_a_run():
    assert stage_key("swarm", 3) == "swarm_stage_3" and config_key("exp.1") == "exp.1_config"
    assert trainers_key("swarm") == "swarm_trainers"
    with pytest.raises(ValueError):
        stage_key("swarm", 64)


def test_v1_schema_has_the_v2_fields_and_bounds():
    v1 = derive_v1(PeerRecord)
    assert list(v1.__fields__) == list(PeerRecord.model_fields)
    expected = {f"stage_{k}" for k in range(64)} | {f"digests_{k}" for k in range(64)} | {"config", "trainers",
                                                                                               "revoked"}
    assert set(run_schema().__fields__) == expected
    raw = record()
    assert v1.parse_obj(raw).dict() == raw  # what hivemind's SchemaValidator compares


def test_a_revocation_record_is_a_strict_list_of_ids():
    from pydantic.v1 import ValidationError

    from dht.records import RevocationRecord

    v1 = derive_v1(RevocationRecord)
    raw = RevocationRecord(run="swarm", ids=["0123456789abcdef"], published_at=1.0, owner_key="k",
                           signature="s").to_dht()
    assert v1.parse_obj(raw).dict() == raw
    for bad in ({"ids": "0123456789abcdef"}, {"ids": [1]}, {"ids": ["x" * 65]}, {"ids": ["a"] * 5000}):
        with pytest.raises(ValidationError):
            v1.parse_obj({**raw, **bad})


def test_a_digest_record_is_a_strict_epoch_and_list_of_floats():
    from pydantic.v1 import ValidationError

    v1 = derive_v1(DigestRecord)
    raw = DigestRecord(epoch=3, digest=[1.0, 2.5]).to_dht()
    assert v1.parse_obj(raw).dict() == raw and digests_key("swarm", 2) == "swarm_digests_2"
    for bad in ({"epoch": -1}, {"digest": [1, 2]}, {"digest": "1.0"}, {"digest": [0.0] * 5000}):
        with pytest.raises(ValidationError):
            v1.parse_obj({**raw, **bad})


@pytest.mark.parametrize("bad", [
    {"throughput": 12},  # an int where a float belongs: strict, no conversion
    {"state": "HAPPY"},
    {"queue": -1},
    {"stage": "1"},
    {"endpoint": "x" * 300},
    {"endpoint": "unix:/run/secret.sock"},  # gRPC would dial a local socket
    {"endpoint": "10.0.0.1"},  # no port
    {"endpoint": "a:1:2"},
    {"throughput": 1e300},  # a share of the traffic in proportion to a lie
    {"throughput": float("inf")},
    {"throughput_ema": 1e9},
    {"tls_sha256": "AB" * 32},  # a certificate pin: 64 lowercase hex digits, nothing else
    {"tls_sha256": "ab" * 31},
    {"tls_sha256": "ab" * 32 + "\n"},
    {"tls_sha256": "zz" * 32},
    {"tls_sha256": 5},
])
def test_v1_schema_refuses_wrong_types_and_values(bad):
    from pydantic.v1 import ValidationError

    with pytest.raises(ValidationError):
        derive_v1(PeerRecord).parse_obj({**record(), **bad})


def test_a_certificate_pin_is_stored_and_read_unchanged():
    raw = record(tls_sha256="0f" * 32)
    assert derive_v1(PeerRecord).parse_obj(raw).dict() == raw
    assert PeerRecord.model_validate(raw).tls_sha256 == "0f" * 32 and PeerRecord.model_validate(record()).tls_sha256 \
        is None
    with pytest.raises(ValueError):  # the peer's own side refuses a bad one too (pydantic's ValidationError)
        PeerRecord.model_validate({**raw, "tls_sha256": "0F" * 32})


def test_v1_schema_refuses_a_missing_required_field():
    from pydantic.v1 import ValidationError

    raw = record()
    del raw["state"]
    with pytest.raises(ValidationError):
        derive_v1(PeerRecord).parse_obj(raw)


def test_newer_and_older_records_interoperate():
    v1 = derive_v1(PeerRecord)
    newer = {**record(), "gpu_memory_gb": 80.0}  # a field a later version adds
    assert v1.parse_obj(newer).dict() == newer  # stored unchanged by this version's nodes
    assert PeerRecord.model_validate(newer).throughput == 12.5  # read, unknown field ignored
    older = record()
    del older["dht_peer_id"]  # a field an older version did not have
    assert v1.parse_obj(older).dict() == older
    assert PeerRecord.model_validate(older).dht_peer_id is None
    dropped = {**record(), "bandwidth_mbps": None}  # a field older versions announced and this one dropped
    assert v1.parse_obj(dropped).dict() == dropped and PeerRecord.model_validate(dropped).throughput == 12.5


def test_config_hash_is_canonical_and_sensitive():
    a = {"preset": "tiny", "lr": 0.001, "stages": 2}
    assert config_hash(a) == config_hash(dict(reversed(list(a.items()))))
    assert config_hash(a) != config_hash({**a, "lr": 0.002})
    assert len(config_hash(a)) == 16
    rec = RunConfigRecord.create("r", a, "0.1.0")
    assert rec.verified() and not rec.model_copy(update={"config": {**a, "stages": 3}}).verified()
    assert config_diff(a, {**a, "stages": 3}) == ["stages: 2 (here) != 3 (run)"]
    raw = rec.to_dht()
    assert derive_v1(RunConfigRecord).parse_obj(raw).dict() == raw
