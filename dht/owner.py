"""Who owns a run: the bootstrap that started it, known to every peer by its libp2p peer id.

A run belongs to the identity of its bootstrap. hivemind keeps a node's identity as an RSA key
(``--identity-path``), and the libp2p peer id of an RSA key is the SHA-256 multihash of its public
key, so anyone who knows the owner's peer id can check what the owner signed with nothing else to
copy: the id is the ``/p2p/...`` end of the ``--initial-peers`` line that the bootstrap printed (or
``--run-owner``). The run's config record carries the owner's public key and signature
(:func:`sign_record`); peers republish it unchanged, so it outlives the bootstrap, and a record
signed by anyone else is ignored (:func:`owner_problem`). A bootstrap restarted with the same
``--identity-path`` keeps the same peer id, so it still owns the run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.multiaddr import Multiaddr

from dht.errors import ControlPlaneError
from dht.node import parse_initial_peers
from dht.records import RunConfigRecord, signed_payload
from dht.signing import keep_private

SHA2_256 = b"\x12\x20"  # multihash prefix: sha2-256, 32 bytes


def load_identity(path: Path | str) -> RSAPrivateKey:
    """The RSA key of a hivemind identity file (a libp2p ``PrivateKey`` protobuf).

    :raises ControlPlaneError: not an identity file, or not an RSA one
    """
    path = Path(path)
    try:
        keep_private(path)
        proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        der = serialization.load_der_private_key(proto.data, password=None)
    except (OSError, DecodeError, ValueError, TypeError) as e:
        raise ControlPlaneError(f"{path}: not a readable libp2p identity file ({e})") from None
    if proto.key_type != crypto_pb2.RSA:
        raise ControlPlaneError(f"{path}: a {crypto_pb2.KeyType.Name(proto.key_type)} identity; a run's owner needs "
                                f"an RSA identity as hivemind creates them (give a path that does not exist yet)")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = der
    return key


def load_or_create_identity(path: Path | str) -> RSAPrivateKey:
    """:func:`load_identity`, creating the file first (hivemind's format, mode 0400) if it does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    return load_identity(path)


def peer_id_of(public: RSAPublicKey) -> str:
    """The libp2p peer id (base58) of the node whose identity has this public key."""
    der = public._public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(SHA2_256 + hashlib.sha256(proto).digest()).to_base58()


def check_peer_id(text: str) -> str:
    """``text`` if it is a base58 libp2p peer id.

    :raises ControlPlaneError: it is not
    """
    try:
        PeerID.from_base58(text)
        if not text.startswith(("Qm", "12D3KooW")):
            raise ValueError(text)
    except Exception:
        raise ControlPlaneError(f"--run-owner {text!r}: expected a libp2p peer id such as QmYyQSo1c1Ym7orWxLYvCrM2EmxFT"
                                f"ANf8wXmmE7DWjhx5N (the end of the bootstrap's --initial-peers address)") from None
    return text


def run_owner(initial_peers: Sequence[str], explicit: str | None = None) -> str:
    """The run owner's peer id: ``explicit`` (``--run-owner``), else the first initial peer's ``/p2p/`` id."""
    if explicit:
        return check_peer_id(explicit)
    if not initial_peers:
        raise ControlPlaneError("no run owner: give --initial-peers (the line the run's bootstrap printed) or "
                                "--run-owner")
    return str(Multiaddr(parse_initial_peers(initial_peers[:1])[0])["p2p"])


def sign_record(record: RunConfigRecord, key: RSAPrivateKey) -> RunConfigRecord:
    """``record`` signed by the run's owner (its public key and signature added)."""
    owned = record.model_copy(update={"owner_key": key.get_public_key().to_bytes().decode(), "signature": ""})
    return owned.model_copy(update={"signature": key.sign(owned.signed_payload()).decode()})


def owner_problem(record: RunConfigRecord, owner: str, stored: dict | None = None) -> str | None:
    """Why ``record`` was not signed by the owner ``owner`` (a peer id), or None when it was.

    :param stored: the dict as stored in the DHT, whose every field the signature covers (default: the record's)
    """
    if not record.owner_key or not record.signature:
        return "it is not signed"
    try:
        public = RSAPublicKey.from_bytes(record.owner_key.encode())
    except Exception:  # cryptography raises several types for a malformed key
        return "its key is malformed"
    signer = peer_id_of(public)
    if signer != owner:
        return f"it is signed by {signer}, not by the run's owner"
    payload = signed_payload(stored) if stored is not None else record.signed_payload()
    if not public.verify(payload, record.signature.encode()):
        return "its signature does not match its content"
    return None
