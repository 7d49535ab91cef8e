"""``swarm-peer identity``, ``invite`` and ``revoke``: the keys and invitations of an invite-only run.

A volunteer runs ``swarm-peer identity --identity-path me.id`` and sends the owner the member key it
prints; the owner runs ``swarm-peer invite --identity-path owner.id --run-id R --member-key '...'``
(the bootstrap's identity signs) and sends back the ``swarm-invite:...`` line, which the volunteer
passes as ``--invite`` to ``join``/``train``/``inspect`` with the same ``--identity-path``. The owner
withdraws an invitation with ``swarm-peer revoke ID`` (see :mod:`dht.admission`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peer.commands import config_from_args
from peer.errors import ConfigError


def _identity(cfg, what: str) -> Path:
    if cfg.net.identity_path is None:
        raise ConfigError(f"{what} needs --identity-path FILE")
    return Path(cfg.net.identity_path).expanduser()


def cmd_identity(args: argparse.Namespace) -> int:
    """Print this node's peer id and member key (creating the identity file and its key beside it if missing)."""
    from dht.node import member_key
    from dht.owner import load_or_create_identity, peer_id_of

    path = _identity(config_from_args(args), "identity")
    peer_id = peer_id_of(load_or_create_identity(path).get_public_key())
    member = member_key(path).get_public_key().to_bytes().decode()
    if args.json:
        print(json.dumps({"kind": "identity", "identity_path": str(path), "peer_id": peer_id, "member_key": member}))
    else:
        print(f"peer id     {peer_id}\nmember key  {member}\n\nSend the member key to the run's owner; start your "
              f"peers with --identity-path {path} and the --invite they send back.")
    return 0


def _member_key(text: str):
    from hivemind.utils.crypto import RSAPublicKey

    path = Path(text).expanduser()
    raw = text.strip()
    if not raw.startswith("ssh-rsa ") and path.is_file():
        raw = path.read_text().strip()
    try:
        return RSAPublicKey.from_bytes(raw.encode())
    except Exception:
        raise ConfigError("--member-key: expected the `ssh-rsa ...` line that `swarm-peer identity` printed (or a "
                          "file holding it)") from None


def cmd_invite(args: argparse.Namespace) -> int:
    """Print an invitation to the run, signed by the owner's identity."""
    from dht.admission import issue_invite, parse_duration
    from dht.owner import load_identity, peer_id_of

    cfg = config_from_args(args)
    owner_key = load_identity(_identity(cfg, "invite (the run owner's: the bootstrap's)"))
    invite = issue_invite(owner_key, cfg.swarm_run_id, _member_key(args.member_key), args.role,
                          time.time() + parse_duration(args.expires))
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(invite.expires_at))
    if args.json:
        print(json.dumps({"kind": "invite", "run": invite.run, "role": invite.role, "id": invite.id,
                          "member": invite.member_peer_id, "expires_at": invite.expires_at,
                          "owner": peer_id_of(owner_key.get_public_key()), "invite": invite.text}))
    else:
        print(f"# run {invite.run}, role {invite.role}, id {invite.id}, until {expires}; revoke with "
              f"`swarm-peer revoke {invite.id}`\n{invite.text}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Publish the owner-signed revocation of invitations (by id or by the whole invitation line)."""
    from dht.admission import ID_PATTERN, parse_invite
    from dht.bootstrap import SelfAdmission
    from dht.errors import ControlPlaneError
    from dht.node import SwarmNode, member_key
    from dht.owner import load_identity, peer_id_of, run_owner
    from dht.revocations import publish_revocation

    cfg = config_from_args(args)
    ids = [i if ID_PATTERN.match(i) else parse_invite(i).id for i in args.ids]
    if not cfg.net.initial_peers:
        raise ConfigError("revoke needs --initial-peers MADDR (a line printed by `swarm-peer bootstrap`)")
    owner_key = load_identity(_identity(cfg, "revoke (the run owner's: the bootstrap's)"))
    owner = run_owner(cfg.net.initial_peers, cfg.net.run_owner)
    if peer_id_of(owner_key.get_public_key()) != owner:
        raise ConfigError(f"--identity-path is not the identity of the run's owner {owner}")
    key = member_key(None)  # a throwaway node, invited by the owner for the few seconds this takes
    access = SelfAdmission(owner_key, key, cfg.swarm_run_id, owner, seconds=600)
    with SwarmNode.start(cfg.swarm_run_id, cfg.net.initial_peers, client_mode=True, keys=[key],
                         authorizer=access.authorizer) as node:
        try:
            record = publish_revocation(node, owner_key, owner, ids)
        except RuntimeError as e:
            raise ControlPlaneError(f"revocation not published: {e}") from None
    if args.json:
        print(json.dumps({"kind": "revoke", "run": cfg.swarm_run_id, "revoked": record.ids}))
    else:
        print(f"run {cfg.swarm_run_id}: {len(record.ids)} invitation(s) revoked ({', '.join(record.ids)}); peers "
              f"refuse them from their next refresh (--update-period)")
    return 0
