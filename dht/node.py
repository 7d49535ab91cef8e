"""A hivemind DHT node with the run's validators, and the errors a user sees when it cannot start.

Every node of a swarm (bootstrap, stage peer, trainer, inspector) is started here, so
every node checks the run's schema (:mod:`dht.schema`) and the owners' signatures
(:mod:`dht.signing`) on what it stores and on what it reads back.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Sequence

import hivemind
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from dht.errors import ControlPlaneError, NoInitialPeersError
from dht.keys import check_run_id
from dht.schema import schema_validator
from dht.signing import KeyringValidator, keep_private, load_or_create_key, owner_subkey

logger = logging.getLogger(__name__)

LOOPBACK_MADDRS = ("/ip4/127.0.0.1/tcp/0",)
ADDRESS_HINT = "copy the `--initial-peers ...` line that `swarm-peer bootstrap` printed"


def parse_initial_peers(initial_peers: Sequence[str]) -> list[str]:
    """Check that every address is a multiaddr that ends in ``/p2p/<peer id>``.

    :raises NoInitialPeersError: naming the bad address and the expected form
    """
    out = []
    for text in initial_peers:
        try:
            maddr = Multiaddr(text)
            maddr["p2p"]
        except Exception:  # multiaddr raises several types (ValueError, KeyError, its own)
            raise NoInitialPeersError(
                f"bad initial peer address {text!r}: expected a multiaddr like "
                f"/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... ({ADDRESS_HINT})"
            ) from None
        out.append(str(maddr))
    return out


def _all_loopback(maddrs: Sequence[str]) -> bool:
    for text in maddrs:
        maddr = Multiaddr(text)
        hosts = [maddr[proto] for proto in ("ip4", "ip6") if proto in maddr]
        if not hosts or not ipaddress.ip_address(hosts[0]).is_loopback:
            return False
    return True


def member_key(identity_path: Path | str | None) -> RSAPrivateKey:
    """The key a node signs its records (and an invite-only run's calls) with: kept beside the identity, as
    ``<identity_path>.rsa`` (a fresh key, for this process only, without an identity)."""
    return load_or_create_key(f"{identity_path}.rsa" if identity_path else None)


class SwarmNode:
    """One running hivemind DHT node of a run, with the keys it signs its records with.

    :param dht: the hivemind DHT (pass it to hivemind averagers/optimizers as is)
    :param run_id: the run whose keys this node validates and uses
    :param keys: the RSA keys this node may sign records for; ``keys[0]`` is its own
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, keys: Sequence[RSAPrivateKey]):
        self.dht, self.run_id, self.keys = dht, run_id, list(keys)

    @property
    def key(self) -> RSAPrivateKey:
        return self.keys[0]

    @property
    def owner_subkey(self) -> bytes:
        return owner_subkey(self.key)

    @classmethod
    def start(
        cls,
        run_id: str,
        initial_peers: Sequence[str] = (),
        *,
        host_maddrs: Sequence[str] = LOOPBACK_MADDRS,
        announce_maddrs: Sequence[str] = (),
        identity_path: Path | str | None = None,
        keys: Sequence[RSAPrivateKey] = (),
        client_mode: bool = False,
        wait_timeout: float = 3.0,
        startup_timeout: float = 30.0,
        fresh_identity: bool = False,
        authorizer=None,
    ) -> "SwarmNode":
        """Start a DHT node that joins ``initial_peers`` (or starts a new swarm without them).

        :param host_maddrs: where to listen, e.g. ``/ip4/0.0.0.0/tcp/31337``
        :param announce_maddrs: the addresses others should dial (port forwarding, public IP)
        :param identity_path: libp2p key file (created if missing): a stable peer id and address;
          the record-signing RSA key is kept beside it (``<identity_path>.rsa``) for a stable subkey
        :param keys: RSA keys to sign records with (default: the identity's key, or a fresh one)
        :param client_mode: only make requests (inspector, trainer behind NAT), store nothing
        :param fresh_identity: ``identity_path`` was just created: skip hivemind's check that no running peer uses
          it (a second libp2p node, seconds of startup, for a key nobody else can hold)
        :param authorizer: signs and checks every DHT request and reply (an invite-only run's
          :class:`~dht.admission.InviteAuthorizer`; it must sign with ``keys[0]``)
        :raises NoInitialPeersError: a malformed address, or none of ``initial_peers`` answered
        :raises ControlPlaneError: the node could not start (port in use, identity taken, ...)
        """
        check_run_id(run_id)
        initial_peers = parse_initial_peers(initial_peers)
        if identity_path and Path(identity_path).exists():
            keep_private(Path(identity_path))
        if not keys:
            keys = [member_key(identity_path)]
        validators = [schema_validator(run_id), KeyringValidator(keys)]
        host_maddrs = list(host_maddrs) or list(LOOPBACK_MADDRS)
        try:
            dht = hivemind.DHT(
                initial_peers=initial_peers or None, start=False, record_validators=validators,
                host_maddrs=host_maddrs, announce_maddrs=list(announce_maddrs) or None,
                identity_path=str(identity_path) if identity_path else None, client_mode=client_mode,
                wait_timeout=wait_timeout, startup_timeout=startup_timeout,
                check_if_identity_free=not fresh_identity, authorizer=authorizer,
                # UPnP / NAT-PMP discovery sends packets on the LAN; only useful when listening beyond loopback
                nat_port_map=not _all_loopback(host_maddrs),
            )
        except ValueError as e:  # e.g. an announce address with port 0
            raise ControlPlaneError(f"cannot start the DHT node: {e}") from None
        try:
            dht.run_in_background(await_ready=True, timeout=startup_timeout + 2 * wait_timeout)
        except BaseException as e:
            if dht.is_alive():
                dht.shutdown()
            dht.join(5)
            raise _explain_start_failure(e, initial_peers, identity_path) from e
        node = cls(dht, run_id, keys)
        logger.debug("DHT node %s up for run %s", dht.peer_id, run_id)
        return node

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs others can use as ``--initial-peers`` (unspecified addresses dropped)."""
        out = []
        for maddr in self.dht.get_visible_maddrs():
            text = str(maddr)
            if "/ip4/0.0.0.0/" not in text and "/ip6/::/" not in text:
                out.append(text)
        return out

    def shutdown(self) -> None:
        if self.dht.is_alive():
            self.dht.shutdown()

    def __enter__(self) -> "SwarmNode":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _explain_start_failure(error: BaseException, initial_peers: list[str], identity_path) -> Exception:
    text = str(error)
    if isinstance(error, ControlPlaneError):
        return error
    timed_out = isinstance(error, TimeoutError) or "failed to start in" in text
    if ("failed to connect to bootstrap peers" in text or "none of the initial_peers responded" in text
            or (initial_peers and timed_out)):
        return NoInitialPeersError(
            f"none of the initial peers answered ({', '.join(initial_peers)}); check that the address is right "
            f"({ADDRESS_HINT}), that the node is running and reachable from here, and that this node has an "
            f"invitation (--invite) if and only if the run is invite-only (an invite-only run's nodes refuse "
            f"uninvited ones; an open run's nodes do not carry invitations)"
        )
    if "already taken" in text:
        return ControlPlaneError(
            f"the identity in {identity_path} is used by another running peer; stop it or pass another --identity-path"
        )
    if isinstance(error, (P2PDaemonError, TimeoutError, RuntimeError, OSError)):
        return ControlPlaneError(f"cannot start the DHT node: {text.splitlines()[0] if text else type(error).__name__}")
    return error  # a bug, not a user error: keep the traceback
