"""Who may take part in an invite-only run: owner-signed invitations, checked on every DHT call and every hop.

A run's owner (:mod:`dht.owner`) decides its admission (``--admission``, part of the signed run
record). ``open``: anyone may join. ``invite``: only holders of an invitation that the owner signed.

An **invitation** binds one member key (the RSA key a peer signs its DHT records with, kept in
``<identity-path>.rsa``; ``swarm-peer identity`` prints it) to the run, a role (``peer``: serve a
stage; ``trainer``; ``observer``: read the DHT only) and an expiry. ``swarm-peer invite`` makes one.
It is a hivemind ``AccessToken`` (its ``username`` holds the run, role, invitation id and the
owner's public key; ``public_key`` the member's), so that hivemind's own authorizer protocol can
carry it on every DHT request and reply (:class:`InviteAuthorizer`): a node refuses, in both
directions, any DHT message not signed by the key of a valid invitation, so an uninvited node can
neither read nor store a record (stage, progress, averager declarations alike).

The data plane uses a signed per-call credential (:class:`Admission`): a caller sends its
invitation and a signature, with the member key, of the run, the callee's address and the current
time as gRPC metadata, and a stage peer refuses a hop without a valid one with PERMISSION_DENIED.
A callee cannot use a credential it received anywhere else. A credential rather than mutual TLS
because the members' keys already exist and the owner's signature is the authority: a TLS
certificate authority would be a second one to run and keep in step. The signature is renewed
every :data:`CREDENTIAL_PERIOD_S`; without TLS, an eavesdropper on a link could replay one to that
same peer for up to :data:`CLOCK_SKEW_S` and send microbatches as that member.

**Revocation**: ``swarm-peer revoke`` publishes an owner-signed list of revoked invitation ids
under ``{run}_revoked`` (each list contains the previous ones); every node of the run takes the
newest list it can verify, refuses the listed invitations, and republishes that list under its
own subkey so it outlives the command that wrote it.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from google.protobuf.message import DecodeError
from hivemind.proto import dht_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time

from dht.announce import stored_records
from dht.errors import ControlPlaneError
from dht.owner import peer_id_of
from dht.records import RevocationRecord, signed_payload

ADMISSIONS = ("open", "invite")
ROLES = ("peer", "trainer", "observer")
OWNER_ROLE = "owner"  # the bootstrap's own invitation, which it signs itself
TOKEN_PREFIX = "swarm-invite:"
CLOCK_SKEW_S = 60.0  # a hop credential older or newer than this is refused (as hivemind does for DHT calls)
CREDENTIAL_PERIOD_S = 20.0  # a caller signs a new hop credential this often
HOP_ROLES = {True: frozenset({OWNER_ROLE, "peer", "trainer"}), False: frozenset({OWNER_ROLE, "peer"})}
"""Roles whose hops a stage serves: stage 0 (True) takes trainers' microbatches, later stages only peers'."""
ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
MAX_ABOUT_CHARS = 2048  # an invitation's run, role, id and owner key: far less (a stranger's may be anything)


class AdmissionError(ControlPlaneError):
    """An invitation that cannot be used: malformed, for another run, expired, revoked, or not the owner's."""


@dataclass(frozen=True)
class Invite:
    """A parsed invitation (its signature is checked by :func:`invite_problem`, not here)."""

    run: str
    role: str
    id: str
    owner_key: str
    member_key: bytes
    expires_at: float
    token: AccessToken

    @property
    def text(self) -> str:
        return TOKEN_PREFIX + base64.urlsafe_b64encode(self.token.SerializeToString()).decode()

    @property
    def member_peer_id(self) -> str:
        """The libp2p-style id of the member key (what the inspector and logs show)."""
        return peer_id_of(RSAPublicKey.from_bytes(self.member_key))


def _payload(token: AccessToken) -> bytes:
    return b"swarm-invite\n" + token.username.encode() + b"\n" + token.public_key + b"\n" + \
        token.expiration_time.encode()


def issue_invite(owner: RSAPrivateKey, run: str, member: RSAPublicKey, role: str, expires_at: float) -> Invite:
    """An invitation of ``member`` to ``run`` as ``role`` until ``expires_at`` (unix time), signed by ``owner``."""
    if role not in (*ROLES, OWNER_ROLE):
        raise AdmissionError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    about = {"run": run, "role": role, "id": secrets.token_hex(8), "owner": owner.get_public_key().to_bytes().decode()}
    token = AccessToken(username=json.dumps(about, sort_keys=True, separators=(",", ":")),
                        public_key=member.to_bytes(), expiration_time=f"{expires_at:.0f}")
    token.signature = owner.sign(_payload(token))
    return from_token(token)


def from_token(token: AccessToken) -> Invite:
    """The invitation an ``AccessToken`` carries.

    :raises AdmissionError: it is not one of ours
    """
    if len(token.username) > MAX_ABOUT_CHARS:
        raise AdmissionError("not a swarm-peer invitation (too long)")
    try:
        about = json.loads(token.username)
        invite = Invite(run=str(about["run"]), role=str(about["role"]), id=str(about["id"]),
                        owner_key=str(about["owner"]), member_key=bytes(token.public_key),
                        expires_at=float(token.expiration_time), token=token)
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise AdmissionError(f"not a swarm-peer invitation ({type(e).__name__})") from None
    if not ID_PATTERN.match(invite.id):
        raise AdmissionError("not a swarm-peer invitation (bad id)")
    return invite


def parse_invite(text: str) -> Invite:
    """The invitation in ``text`` (``swarm-invite:...``, as ``swarm-peer invite`` prints it).

    :raises AdmissionError: it is not one
    """
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise AdmissionError(f"an invitation starts with {TOKEN_PREFIX!r} (as `swarm-peer invite` prints it)")
    try:
        token = AccessToken.FromString(base64.urlsafe_b64decode(text[len(TOKEN_PREFIX):].encode()))
    except (ValueError, DecodeError):
        raise AdmissionError("the invitation is garbled: copy the whole line `swarm-peer invite` printed") from None
    return from_token(token)


def read_invite(value: str) -> Invite:
    """``--invite``: the invitation itself, or a file holding it (a local path the user gave).

    :raises AdmissionError: neither
    """
    if value.strip().startswith(TOKEN_PREFIX):
        return parse_invite(value)
    path = Path(value).expanduser()
    try:
        return parse_invite(path.read_text())
    except OSError as e:
        raise AdmissionError(f"--invite {value!r}: neither an invitation ({TOKEN_PREFIX}...) nor a readable file "
                             f"({e.strerror})") from None


@functools.lru_cache(maxsize=4096)
def _verifies(key: bytes, payload: bytes, signature: bytes) -> bool:
    try:
        return RSAPublicKey.from_bytes(key).verify(payload, signature)
    except Exception:  # a malformed key: cryptography raises several types
        return False


def _signature_problem(key: str, owner: str, payload: bytes, signature: bytes) -> str | None:
    """Why ``signature`` over ``payload`` is not the owner's (``key`` must hash to peer id ``owner``), or None."""
    try:
        signer = peer_id_of(RSAPublicKey.from_bytes(key.encode()))
    except Exception:  # cryptography raises several types for a malformed key
        return "its owner key is malformed"
    if signer != owner:
        return f"it was signed by {signer}, not by the run's owner {owner}"
    if not _verifies(key.encode(), payload, signature):
        return "its signature does not match"
    return None


def invite_problem(invite: Invite, run: str, owner: str, revoked: Iterable[str] = (),
                   now: float | None = None) -> str | None:
    """Why ``invite`` does not admit its holder to ``run`` (owned by peer id ``owner``), or None when it does."""
    if invite.run != run:
        return f"it is for run {invite.run!r}, not {run!r}"
    problem = _signature_problem(invite.owner_key, owner, _payload(invite.token), bytes(invite.token.signature))
    if problem:
        return problem
    if invite.role not in (*ROLES, OWNER_ROLE):
        return f"unknown role {invite.role!r}"
    if (get_dht_time() if now is None else now) > invite.expires_at:
        return f"it expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(invite.expires_at))}"
    if invite.id in set(revoked):
        return f"it was revoked (invitation {invite.id})"
    return None


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d`` -> seconds.

    :raises AdmissionError: anything else
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise AdmissionError(f"--expires {text!r}: give a duration such as 3600, 30m, 12h or 7d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


class InviteAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer for an invite-only run: every request and reply must carry a valid invitation
    whose member key signed it. Lives in the DHT's process; :func:`set_revoked` updates its revoked ids."""

    def __init__(self, key: RSAPrivateKey, invite: Invite, owner: str):
        super().__init__(key)
        if invite.member_key != key.get_public_key().to_bytes():
            raise AdmissionError("this invitation is for another key: run with the --identity-path it was made for")
        self.invite, self.owner, self.revoked = invite, owner, frozenset()

    async def get_token(self) -> AccessToken:
        return self.invite.token

    async def validate_request(self, request) -> bool:
        """hivemind's checks, and an observer's invitation stores nothing (it may only read)."""
        if not await super().validate_request(request):
            return False
        if isinstance(request, dht_pb2.StoreRequest):
            try:
                return from_token(request.auth.client_access_token).role != "observer"
            except AdmissionError:
                return False
        return True

    def is_token_valid(self, access_token: AccessToken) -> bool:
        try:
            invite = from_token(access_token)
        except AdmissionError:
            return False
        return invite_problem(invite, self.invite.run, self.owner, self.revoked) is None

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False

    async def refresh_token_if_needed(self) -> None:
        # hivemind asserts that its own token is valid: ours may expire or be revoked, which others will refuse
        # (and the peer reports); it must not turn into an AssertionError inside every DHT call
        self._local_access_token = self.invite.token


async def _set_revoked(ids: frozenset, dht, node) -> None:  # runs in the DHT's process
    authorizer = node.protocol.authorizer
    if isinstance(authorizer, InviteAuthorizer):
        authorizer.revoked = ids


def set_revoked(dht, ids: Iterable[str]) -> None:
    """Give the DHT process's authorizer the run's revoked invitation ids."""
    dht.run_coroutine(functools.partial(_set_revoked, frozenset(ids)), return_future=True)


class Admission:
    """What this process knows of its run's admission: the mode, the owner, its own invitation and key, and the
    revoked ids; makes this peer's hop credentials and checks its callers'.

    :param mode: ``open`` or ``invite``
    :param owner: the run owner's peer id
    :param key: this peer's member key (signs its credentials)
    :param invite: this peer's invitation (None in an open run)
    """

    def __init__(self, run: str, mode: str, owner: str, key: RSAPrivateKey | None = None,
                 invite: Invite | None = None):
        if mode not in ADMISSIONS:
            raise AdmissionError(f"unknown admission {mode!r}: choose one of {', '.join(ADMISSIONS)}")
        self.run, self.mode, self.owner, self.key, self.invite = run, mode, owner, key, invite
        self.revoked: frozenset[str] = frozenset()
        self._credentials: dict[str, tuple[float, list[tuple[str, str]]]] = {}  # by callee address
        self._callers: dict[str, Invite] = {}

    @property
    def closed(self) -> bool:
        return self.mode == "invite"

    def own_problem(self) -> str | None:
        """Why this peer's own invitation does not (or no longer) admits it, or None."""
        if not self.closed:
            return None
        if self.invite is None:
            return "run is invite-only and this peer has no --invite"
        return invite_problem(self.invite, self.run, self.owner, self.revoked)

    def credential(self, address: str) -> list[tuple[str, str]]:
        """gRPC metadata for a hop to ``address`` (empty in an open run): the invitation and a fresh signature of
        the run, that address and the time, so that the callee cannot use it anywhere else."""
        if not self.closed or self.invite is None or self.key is None:
            return []
        now = time.time()
        known = self._credentials.get(address)
        if known is None or now - known[0] > CREDENTIAL_PERIOD_S:
            if len(self._credentials) > 1024:  # addresses come from records: a bound on what they can make us keep
                self._credentials.clear()
            stamp = f"{now:.0f}"
            signature = self.key.sign(_hop_payload(self.run, address, stamp))
            known = self._credentials[address] = (now, [("x-swarm-invite", self.invite.text), ("x-swarm-time", stamp),
                                                        ("x-swarm-signature", signature.decode())])
        return known[1]

    def _caller(self, text: str) -> Invite:
        invite = self._callers.get(text)
        if invite is None:
            invite = parse_invite(text)
            if len(self._callers) > 4096:  # a bound on what strangers' garbage can make this cache hold
                self._callers.clear()
            self._callers[text] = invite
        return invite

    def caller_problem(self, metadata: Iterable[tuple[str, str | bytes]], first_stage: bool,
                       endpoint: str) -> str | None:
        """Why the caller of a hop with this gRPC metadata may not send it here (``endpoint``: this peer's address as
        its callers dial it), or None (always None when open)."""
        if not self.closed:
            return None
        got = {k: v for k, v in metadata if isinstance(v, str)}
        text, stamp, signature = got.get("x-swarm-invite"), got.get("x-swarm-time", ""), got.get("x-swarm-signature")
        if not text or not signature:
            return "this run is invite-only and the call carries no invitation"
        try:
            invite = self._caller(text)
        except AdmissionError as e:
            return str(e)
        problem = invite_problem(invite, self.run, self.owner, self.revoked)
        if problem:
            return f"the caller's invitation is refused: {problem}"
        if invite.role not in HOP_ROLES[first_stage]:
            return f"a {invite.role}'s invitation does not allow sending microbatches to this stage"
        try:
            late = abs(time.time() - float(stamp))
        except ValueError:
            return "a malformed credential"
        if not late <= CLOCK_SKEW_S:  # NaN too
            return f"a credential {late:.0f} s off this peer's clock (stale, replayed, or a clock to fix)"
        if not _verifies(invite.member_key, _hop_payload(self.run, endpoint, stamp), signature.encode()):
            return "the credential is not signed by the invitation's key for this peer"
        return None


def _hop_payload(run: str, address: str, stamp: str) -> bytes:
    return f"swarm-hop\n{run}\n{address}\n{stamp}".encode()


# ---- revocation ----

def sign_revocation(owner: RSAPrivateKey, run: str, ids: Iterable[str],
                    published_at: float | None = None) -> RevocationRecord:
    record = RevocationRecord(run=run, ids=sorted(set(ids)),
                              published_at=get_dht_time() if published_at is None else published_at,
                              owner_key=owner.get_public_key().to_bytes().decode())
    return record.model_copy(update={"signature": owner.sign(record.signed_payload()).decode()})


def revocation_problem(record: RevocationRecord, stored: dict, run: str, owner: str) -> str | None:
    """Why a revocation list is not the owner's for ``run``, or None."""
    if record.run != run:
        return f"it is for run {record.run!r}, not {run!r}"
    return _signature_problem(record.owner_key, owner, signed_payload(stored), record.signature.encode())


def owner_revocations(found, run: str, owner: str) -> list[RevocationRecord]:
    """Every owner-signed revocation list among a DHT ``get`` result's subkeys, oldest first. Revoking only adds
    ids, so a reader refuses the ids of all of them (a list signed on a clock that was behind is not lost)."""
    out = [record for _, stored, record in stored_records(found, RevocationRecord)
           if revocation_problem(record, stored, run, owner) is None]
    return sorted(out, key=lambda r: r.published_at)

