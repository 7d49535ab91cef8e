"""The values stored in the DHT, defined once as pydantic (v2) models.

* :class:`PeerRecord` - what a stage peer says about itself under ``{run}_stage_{k}``,
  subkey its owner public key: state, the gRPC endpoint others dial, throughput, load.
* :class:`RunConfigRecord` - the run's shared model/training config and its hash under
  ``{run}_config``.
* :class:`DigestRecord` - a stage replica's epoch and parameter digest under ``{run}_digests_{k}``,
  subkey its owner public key (the same key as its stage record).
* :class:`RevocationRecord` - the invitations the run's owner revoked, under ``{run}_revoked``.
* :class:`TrainerRecord` - a trainer's progress and fault counters under ``{run}_trainers``,
  subkey its owner public key (what ``swarm-peer inspect`` shows of the trainers).

Compatibility rule: readers ignore fields they do not know (``extra="ignore"``) and
every field added after version 1 must have a default, so older and newer peers can
read each other's records. The storing nodes check the same models through the
pydantic.v1 schema derived in :mod:`dht.schema`. No hivemind import here.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RECORD_VERSION = 1
MAX_UPDATE_PERIOD = 3600.0
MAX_LIFETIME = 3 * MAX_UPDATE_PERIOD + 60.0
"""Readers ignore records that claim to expire later than this from now: no honest peer writes them."""


MAX_THROUGHPUT = 1e7
"""Samples/s no stage of any preset reaches on any device: a record claiming more (or inf) is refused."""
TLS_SHA256_PATTERN = r"^[0-9a-f]{64}$"
ENDPOINT_PATTERN = r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}$"


class PeerState(str, enum.Enum):
    """Lifecycle of a stage peer: JOINING -> ONLINE -> DRAINING -> OFFLINE."""

    JOINING = "JOINING"  # announced, still loading state / measuring; do not route to it
    ONLINE = "ONLINE"  # serving forward/backward
    DRAINING = "DRAINING"  # finishing in-flight work; take no new microbatches
    OFFLINE = "OFFLINE"  # gone (written on shutdown so readers drop it before it expires)


ROUTABLE_STATES = frozenset({PeerState.ONLINE})
LIVE_STATES = frozenset({PeerState.JOINING, PeerState.ONLINE, PeerState.DRAINING})


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True, frozen=True)

    def to_dht(self) -> dict[str, Any]:
        """The msgpack-able dict that is stored (enums as their names, floats stay floats)."""
        return self.model_dump(mode="json")


class PeerRecord(_Record):
    """One stage peer as it announces itself."""

    schema_version: int = Field(RECORD_VERSION, ge=1)
    """Version of this record's layout (readers ignore unknown fields of newer versions)."""
    state: PeerState
    """Lifecycle state."""
    stage: int = Field(ge=0, lt=64)
    """The pipeline stage this peer serves (equals the k of the key it is stored under)."""
    endpoint: str | None = Field(None, max_length=255, pattern=ENDPOINT_PATTERN)
    """gRPC endpoint ``host:port`` as other peers must dial it (None while JOINING without a server): a host name,
    an IPv4 address or a bracketed IPv6 one, and a port; nothing else a gRPC target could name (``unix:``...)."""
    throughput: float = Field(0.0, ge=0.0, le=MAX_THROUGHPUT)
    """Measured forward+backward samples/s of this stage on this peer's device."""
    throughput_ema: float | None = Field(None, ge=0.0, le=MAX_THROUGHPUT)
    """Live exponential moving average of the samples/s actually served (None before any work)."""
    queue: int = Field(0, ge=0)
    """Microbatches waiting for this peer's compute worker."""
    inflight: int = Field(0, ge=0)
    """Microbatches this peer is processing or waiting on downstream."""
    version: str = Field(max_length=64)
    """swarm-peer package version of the peer."""
    fingerprint: str = Field("", max_length=64)
    """Hash of the run config this peer joined with (see :func:`config_hash`)."""
    public_name: str | None = Field(None, max_length=64)
    """A name the volunteer chose to be shown in the inspector."""
    started_at: float = Field(ge=0.0)
    """DHT time (seconds since the epoch) at which this peer started."""
    updated_at: float = Field(ge=0.0)
    """DHT time of this write."""
    update_period: float = Field(15.0, gt=0.0, le=MAX_UPDATE_PERIOD)
    """Seconds between refreshes of this record (the record expires after a few of them)."""
    step: int = Field(0, ge=0)
    """Last optimizer step this peer's stage completed."""
    dht_peer_id: str | None = Field(None, max_length=128)
    """libp2p peer id of the peer's DHT node."""
    auto_stage: bool = False
    """Started with ``--stage auto``: the peer may move to another stage (rebalancing); pinned peers never do."""
    moves: int = Field(0, ge=0)
    """Times this peer moved to another stage."""
    moved_at: float | None = Field(None, ge=0.0)
    """DHT time of its last move (None: never moved)."""
    tls_sha256: str | None = Field(None, max_length=64, pattern=TLS_SHA256_PATTERN)
    """SHA-256 (64 lowercase hex digits) of the DER certificate the peer serves gRPC with over TLS (``--tls-cert``):
    dialers connect with TLS and accept exactly that certificate. None: it serves plaintext."""


class DigestRecord(_Record):
    """A stage replica's parameter digest at an epoch (see ``peer.stage.replicas``), under its owner subkey."""

    epoch: int = Field(ge=0)
    """The replica's epoch when it computed the digest."""
    digest: list[float] = Field(max_length=4096)
    """Per parameter tensor, the sum of squares of its values."""


class TrainerRecord(_Record):
    """One trainer's progress and fault counters, refreshed while it trains and once more when it ends."""

    schema_version: int = Field(RECORD_VERSION, ge=1)
    """Version of this record's layout."""
    trainer_id: str = Field(max_length=64)
    """The trainer's id (as in its metrics)."""
    state: str = Field("TRAINING", max_length=16)
    """TRAINING, WAITING (a stage has no live peer) or DONE."""
    steps: int = Field(0, ge=0)
    """Global batches completed."""
    microbatches_sent: int = Field(0, ge=0)
    """Microbatches taken from the data and sent."""
    microbatches_done: int = Field(0, ge=0)
    """Microbatches that came back with a loss."""
    retries: int = Field(0, ge=0)
    """Hops and routes retried."""
    failures: int = Field(0, ge=0)
    """Routes that failed and were retried from the trainer."""
    bans: int = Field(0, ge=0)
    """Peers banned by this trainer's router."""
    waits: int = Field(0, ge=0)
    """Times it waited for a stage with no live peer."""
    recoveries: int = Field(0, ge=0)
    """Failures followed by a microbatch that got through."""
    max_recovery_s: float = Field(0.0, ge=0.0)
    """Longest time from a failure to the next microbatch that got through."""
    lost: int = Field(0, ge=0)
    """Microbatches neither completed nor in flight (known once DONE; must be 0)."""
    checks: int = Field(0, ge=0)
    """Microbatches it sent again along another route to check the loss."""
    caught: int = Field(0, ge=0)
    """Checks that found a route answering a loss the others did not."""
    distrusted: list[str] = Field([], max_length=32)
    """Addresses it routes around since a check caught them (see ``peer.swarm.checks``)."""
    tokens_per_s: float = Field(0.0, ge=0.0)
    """Recent training throughput."""
    loss: float | None = None
    """Last training loss."""
    version: str = Field(max_length=64)
    """swarm-peer version of the trainer."""
    updated_at: float = Field(ge=0.0)
    """DHT time of this write."""
    update_period: float = Field(15.0, gt=0.0, le=MAX_UPDATE_PERIOD)
    """Seconds between refreshes (the record expires after a few of them)."""


class RunConfigRecord(_Record):
    """The run's shared model/training config; a peer whose own config hashes differently must not join."""

    schema_version: int = Field(RECORD_VERSION, ge=1)
    """Version of this record's layout."""
    run: str = Field(max_length=64)
    """Run id."""
    hash: str = Field(max_length=64)
    """:func:`config_hash` of ``config``."""
    config: dict[str, Any]
    """Flat ``{field: value}`` of the settings every peer of the run must share."""
    published_at: float = Field(ge=0.0)
    """DHT time at which the run was first published (the oldest publication wins)."""
    version: str = Field(max_length=64)
    """swarm-peer version of the publisher."""
    tokenizer: str = Field("", max_length=256)
    """Name of the run's tokenizer (``bpe-8192``, or a Hub name), for messages; never loaded from here."""
    tokenizer_fingerprint: str = Field("", max_length=64)
    """Fingerprint of the run's tokenizer: a trainer whose own tokenizer differs is refused."""
    vocab: int = Field(0, ge=0, le=1_000_000)
    """The model's vocabulary size (the run's tokenizer's): stage peers build their embeddings from it."""
    admission: str = Field("open", max_length=16)
    """``open`` (anyone may join) or ``invite`` (only holders of the owner's invitations; see ``dht.admission``)."""
    owner_key: str = Field("", max_length=1024)
    """Public key (OpenSSH) of the run's owner, whose libp2p peer id it hashes to (see ``dht.owner``)."""
    signature: str = Field("", max_length=1024)
    """The owner's signature over the rest of the record."""

    @classmethod
    def create(cls, run: str, config: dict[str, Any], version: str, published_at: float | None = None, **extra):
        return cls(run=run, hash=config_hash(config), config=dict(config), version=version,
                   published_at=time.time() if published_at is None else published_at, **extra)

    def verified(self) -> bool:
        """Whether ``hash`` really is the hash of ``config`` (readers drop records where it is not)."""
        return config_hash(self.config) == self.hash

    def signed_payload(self) -> bytes:
        """What the owner signs (see :func:`signed_payload`)."""
        return signed_payload(self.to_dht())


class RevocationRecord(_Record):
    """The invitations the run's owner revoked (see ``dht.admission``); each list holds the earlier ones too."""

    run: str = Field(max_length=64)
    """Run id."""
    ids: list[str] = Field(max_length=4096)
    """Ids of the revoked invitations."""
    published_at: float = Field(ge=0.0)
    """DHT time of this list (the newest valid list wins)."""
    owner_key: str = Field("", max_length=1024)
    """Public key (OpenSSH) of the run's owner."""
    signature: str = Field("", max_length=1024)
    """The owner's signature over the rest of the record."""

    def signed_payload(self) -> bytes:
        return signed_payload(self.to_dht())


def signed_payload(fields: dict[str, Any]) -> bytes:
    """The canonical JSON of a stored record's fields but ``signature``: what its owner signs. Readers check it on
    the stored dict, so fields that a newer publisher added (and this reader ignores) are covered too."""
    return json.dumps({k: v for k, v in fields.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":"), default=str).encode()


def config_hash(config: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of a flat config (sorted keys, no spaces)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """``["lr: 0.001 (here) != 0.0006 (run)", ...]`` for every field that differs."""
    out = []
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key, "<unset>") != theirs.get(key, "<unset>"):
            out.append(f"{key}: {ours.get(key, '<unset>')!r} (here) != {theirs.get(key, '<unset>')!r} (run)")
    return out
