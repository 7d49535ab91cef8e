"""TLS for the data plane: a stage peer's certificate, its hash, and dialing a peer pinned to exactly it.

A stage peer started with ``--tls-cert``/``--tls-key`` serves gRPC over TLS only and puts the SHA-256 of its
certificate (DER bytes, 64 lowercase hex digits) in its signed DHT record (``PeerRecord.tls_sha256``). No
certificate authority takes part, so a self-signed certificate does: the record is the authority. A dialer
that finds a hash in the callee's record

1. fetches the certificate the peer presents in a TLS handshake (:func:`fetch_certificate`),
2. compares its SHA-256 with the record's; another one means someone else answers at that address (or the
   peer changed its certificate without announcing it), and the hop fails with :class:`PinMismatch`
   (the client turns it into an UNAVAILABLE failure of that peer, which its router bans),
3. opens the gRPC channel with that certificate as its only trusted root, so the channel's own handshake
   succeeds only with the pinned certificate's key; the host name gRPC checks is one the certificate names
   (``grpc.ssl_target_name_override``), since the pin, not the name, is what is verified.

A peer without a hash in its record is dialed in plaintext, as before. This module imports no torch
(``swarm-peer health`` uses it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import logging
import socket
import ssl
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from peer.errors import ConfigError

logger = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 5.0  # a certificate fetch that takes longer fails the hop (the peer is overloaded or gone)


class DialError(Exception):
    """No TLS connection with the peer as its record describes it: nothing answers a TLS handshake there in time,
    or its certificate is unusable."""


class PinMismatch(DialError):
    """The peer at an address presented a certificate other than the one its record pins."""


def certificate_sha256(der: bytes) -> str:
    """The pin of a certificate: SHA-256 of its DER bytes, 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


def host_name(der: bytes) -> str:
    """A name the certificate is made out to (a DNS subjectAltName, else the common name, else an IP
    subjectAltName): what gRPC checks the peer's certificate against once it is pinned.

    :raises ValueError: the certificate names no host
    """
    cert = x509.load_der_x509_certificate(der)
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alt = x509.SubjectAlternativeName([])
    common = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names = [*alt.get_values_for_type(x509.DNSName), *common, *map(str, alt.get_values_for_type(x509.IPAddress))]
    if not names:
        raise ValueError("the certificate names no host (no subjectAltName, no common name)")
    return str(names[0])


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """A stage server's certificate (PEM, the peer's own first, then any chain) and private key (PEM)."""

    cert_pem: bytes
    key_pem: bytes
    sha256: str  # the pin announced in the peer's record

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def load_server_tls(cert_path: Path, key_path: Path) -> ServerTLS:
    """Read and check ``--tls-cert``/``--tls-key``: both readable, a PEM certificate valid now that names a host,
    and the key that belongs to it.

    :raises ConfigError: saying which file is wrong and how
    """
    texts = {}
    for flag, path in (("--tls-cert", cert_path), ("--tls-key", key_path)):
        try:
            texts[flag] = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    cert_text = texts["--tls-cert"]
    try:
        begin = cert_text.index("-----BEGIN CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(cert_text[begin:cert_text.index("-----END CERTIFICATE-----", begin) + 25])
        cert = x509.load_der_x509_certificate(der)
        host_name(der)
    except ValueError as e:
        raise ConfigError(f"--tls-cert {cert_path}: not a usable PEM certificate ({e or 'no certificate in it'})"
                          ) from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(f"--tls-cert {cert_path}: valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                          f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; make a new one (see the README)")
    try:
        # an empty password: an encrypted key fails here instead of prompting for its passphrase
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path, lambda: b"")
    except ssl.SSLError as e:
        raise ConfigError(f"--tls-key {key_path} does not belong to --tls-cert {cert_path}, or is not an unencrypted "
                          f"PEM private key ({e.reason or e})") from None
    return ServerTLS(cert_text.encode(), texts["--tls-key"].encode(), certificate_sha256(der))


def split_address(address: str) -> tuple[str, int]:
    """``("host", port)`` of ``host:port`` or ``[v6]:port``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _fetch_context() -> ssl.SSLContext:
    # Verification is the pin's job (the caller compares hashes): accept any certificate here
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # as a gRPC client offers
    return context


async def fetch_certificate(address: str, timeout: float = HANDSHAKE_TIMEOUT_S) -> bytes:
    """The DER certificate the server at ``address`` presents in a TLS handshake.

    :raises DialError: nothing answers, it does not speak TLS, or not within ``timeout``
    """
    host, port = split_address(address)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=_fetch_context())
    except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
        raise DialError(f"{address}: no TLS handshake ({e or 'timed out'})") from None
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


def fetch_certificate_sync(address: str, timeout: float) -> bytes | None:
    """:func:`fetch_certificate` without a loop (``swarm-peer health``); None when there is no TLS handshake."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with _fetch_context().wrap_socket(raw, server_hostname=None) as tls:
                return tls.getpeercert(binary_form=True)
    except OSError:
        return None


def pinned_credentials(der: bytes) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    """Channel credentials that trust exactly the certificate ``der``, and the channel option that names the host
    gRPC checks it against."""
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    return grpc.ssl_channel_credentials(root_certificates=pem), [("grpc.ssl_target_name_override", host_name(der))]


async def pinned(address: str, sha256: str, timeout: float = HANDSHAKE_TIMEOUT_S):
    """:func:`pinned_credentials` for the peer at ``address`` once it has shown the certificate its record pins.

    :raises PinMismatch: it showed another one (logged as a warning naming the address)
    :raises DialError: no TLS handshake with it (see :func:`fetch_certificate`)
    """
    der = await fetch_certificate(address, timeout)
    shown = certificate_sha256(der)
    if shown != sha256:
        logger.warning("%s presented a TLS certificate with SHA-256 %s but its record pins %s: not sending it "
                       "anything (someone else answers at that address, or the peer changed its certificate "
                       "without announcing it)", address, shown[:16], sha256[:16])
        raise PinMismatch(f"{address}: certificate SHA-256 {shown[:16]}... is not the pinned {sha256[:16]}...")
    try:
        return pinned_credentials(der)
    except ValueError as e:  # it hashes right but names no host: gRPC could not check it
        raise DialError(f"{address}: pinned certificate unusable ({e})") from None
