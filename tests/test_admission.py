"""Invite-only runs (``dht.admission``): invitations, hop credentials, and the DHT refusing uninvited nodes.

* an invitation admits its key to its run as its role until it expires; one that is expired, revoked, for another
  run, signed by someone else or edited is refused;
* a stage peer of an invite-only run refuses a hop with PERMISSION_DENIED unless its caller's credential is valid
  (signed by the invited key, recent, of a role that may call that stage, not revoked), and keeps serving;
* against live `swarm-peer` processes: an uninvited node cannot join the DHT, invited peers and a trainer train,
  and `swarm-peer revoke` shuts a revoked invitation out of the DHT and the data plane.
"""

import json
import subprocess
import time

import grpc
import pytest
from hivemind.utils.crypto import RSAPrivateKey

from conftest import BIN
from dht.admission import (
    OWNER_ROLE, Admission, AdmissionError, InviteAuthorizer, from_token, invite_problem, issue_invite,
    owner_revocations, parse_duration, parse_invite, read_invite, sign_revocation,
)
from dht.node import member_key
from dht.owner import load_identity, peer_id_of
from peer.config import load_config
from peer.errors import ConfigError
from peer.session import member_access
from peer.rpc.client import HopFailed
from stage_helpers import RUN, fresh_stages, send, stage_chain, tokens
from waiting import wait_until

SP = str(BIN / "swarm-peer")
V, T, B = 512, 16, 2
OWNER_KEY = RSAPrivateKey()
OWNER = peer_id_of(OWNER_KEY.get_public_key())
IN_A_DAY = time.time() + 86400


def invited(role="trainer", run=RUN, expires_at=IN_A_DAY, owner_key=OWNER_KEY):
    key = RSAPrivateKey()
    return key, issue_invite(owner_key, run, key.get_public_key(), role, expires_at)


# ---- invitations ----

def test_an_invitation_round_trips_and_admits_its_key():
    key, invite = invited("peer")
    again = parse_invite(invite.text)
    assert (again.run, again.role, again.id, again.member_key) == (RUN, "peer", invite.id,
                                                                   key.get_public_key().to_bytes())
    assert invite_problem(again, RUN, OWNER) is None
    assert again.member_peer_id == peer_id_of(key.get_public_key())


def test_invitations_that_do_not_admit(tmp_path):
    _, invite = invited()
    assert "not 'other-run'" in invite_problem(invite, "other-run", OWNER)
    assert "expired" in invite_problem(invited(expires_at=time.time() - 1)[1], RUN, OWNER)
    assert "revoked" in invite_problem(invite, RUN, OWNER, revoked={invite.id})
    stranger = RSAPrivateKey()  # a stranger signs an invitation of its own for the run
    assert "not by the run's owner" in invite_problem(invited(owner_key=stranger)[1], RUN, OWNER)
    # an invited trainer edits its role to `peer`: the owner's signature no longer matches
    token = type(invite.token)()
    token.CopyFrom(invite.token)
    token.username = token.username.replace('"role":"trainer"', '"role":"peer"')
    assert from_token(token).role == "peer"
    assert "signature" in invite_problem(from_token(token), RUN, OWNER)
    for garbage in ("hello", "swarm-invite:!!!", "swarm-invite:" + "A" * 40):
        with pytest.raises(AdmissionError):
            parse_invite(garbage)
    path = tmp_path / "invite.txt"
    path.write_text(invite.text + "\n")
    assert read_invite(str(path)).id == invite.id
    with pytest.raises(AdmissionError, match="neither an invitation"):
        read_invite(str(tmp_path / "missing.txt"))
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90") == 90
    with pytest.raises(AdmissionError):
        parse_duration("soon")


def test_the_dht_authorizer_takes_only_valid_invitations():
    key, invite = invited("peer")
    authorizer = InviteAuthorizer(key, invite, OWNER)
    assert authorizer.is_token_valid(invited("observer")[1].token)
    assert not authorizer.is_token_valid(invited(expires_at=time.time() - 1)[1].token)
    assert not authorizer.is_token_valid(invited(owner_key=RSAPrivateKey())[1].token)
    _, revoked = invited()
    authorizer.revoked = frozenset({revoked.id})
    assert not authorizer.is_token_valid(revoked.token)
    with pytest.raises(AdmissionError, match="another key"):
        InviteAuthorizer(RSAPrivateKey(), invite, OWNER)


def test_a_command_refuses_an_invitation_that_cannot_admit_it(tmp_path):
    ident = tmp_path / "me.id"
    mine = issue_invite(OWNER_KEY, RUN, member_key(ident).get_public_key(), "trainer", IN_A_DAY)

    def access(role, invite, path=ident):
        cfg = load_config({"run_id": RUN, "identity_path": path, "invite": invite.text})
        return member_access(cfg, OWNER, role)

    key, invite, authorizer = access("trainer", mine)
    assert invite.id == mine.id and authorizer.invite is invite and key.get_public_key().to_bytes() == invite.member_key
    assert access("observer", mine)[1].id == mine.id  # any invitation may read the DHT
    with pytest.raises(ConfigError, match="invites a trainer"):
        access("peer", mine)
    with pytest.raises(ConfigError, match="another key"):
        access("trainer", mine, tmp_path / "other.id")
    with pytest.raises(ConfigError, match="expired"):
        access("trainer", issue_invite(OWNER_KEY, RUN, member_key(ident).get_public_key(), "trainer", time.time() - 5))


def test_only_the_owners_revocation_lists_count():
    from types import SimpleNamespace

    def found(*records):
        return SimpleNamespace(value={bytes([i]): SimpleNamespace(value=r, expiration_time=time.time() + 60)
                                      for i, r in enumerate(records)})

    older = sign_revocation(OWNER_KEY, RUN, ["a" * 16])
    newer = sign_revocation(OWNER_KEY, RUN, ["a" * 16, "b" * 16])
    forged = sign_revocation(RSAPrivateKey(), RUN, [])  # a stranger "unrevokes" everything, later still
    edited = {**newer.to_dht(), "ids": [], "published_at": newer.published_at + 1}  # the owner's, emptied
    other_run = sign_revocation(OWNER_KEY, "other", [])
    lists = owner_revocations(found(older.to_dht(), newer.to_dht(), forged.to_dht(), edited, other_run.to_dht(),
                                    {"garbage": 1}), RUN, OWNER)
    assert [r.ids for r in lists] == [["a" * 16], ["a" * 16, "b" * 16]]  # oldest first; the forged ones dropped
    assert owner_revocations(found(forged.to_dht()), RUN, OWNER) == []
    assert owner_revocations(None, RUN, OWNER) == []


def test_an_observer_may_read_the_dht_but_store_nothing():
    from hivemind.proto import dht_pb2

    from stage_helpers import run_async

    node_key, node_invite = invited("peer")
    node = InviteAuthorizer(node_key, node_invite, OWNER)

    async def accepted(role: str, request) -> bool:
        key, invite = invited(role)
        await InviteAuthorizer(key, invite, OWNER).sign_request(request, None)
        return await node.validate_request(request)

    assert run_async(accepted("observer", dht_pb2.FindRequest(keys=[b"k"])))
    assert not run_async(accepted("observer", dht_pb2.StoreRequest(keys=[b"k"])))
    assert run_async(accepted("peer", dht_pb2.StoreRequest(keys=[b"k"])))


# ---- hops ----

@pytest.fixture(scope="module")
def closed_chain():
    """Two in-process stages of an invite-only run (real gRPC servers), each with its own admission."""
    gates = []
    for _ in range(2):
        key, invite = invited(OWNER_ROLE)
        gates.append(Admission(RUN, "invite", OWNER, key, invite))
    kwargs = {k: {"admission": gate} for k, gate in enumerate(gates)}
    with stage_chain(fresh_stages("tiny", V, T, 2), V, server_kwargs=kwargs) as servers:
        yield servers, gates


def credential(role="trainer", **kwargs):
    key, invite = invited(role, **kwargs)
    return Admission(RUN, "invite", OWNER, key, invite), invite


def denied(address, x, y, stage=0, cred=None) -> str:
    with pytest.raises(HopFailed) as failed:
        send(address, x, y, stage=stage, credential=cred, max_attempts=1, budget=20)
    assert failed.value.code == grpc.StatusCode.PERMISSION_DENIED, failed.value
    return str(failed.value)


def test_an_invite_only_stage_serves_only_valid_credentials(closed_chain):
    servers, gates = closed_chain
    first, second = servers[0][0], servers[1][0]
    x, y = tokens(V, B, T)
    trainer, invite = credential("trainer")
    assert send(first.address, x, y, credential=trainer.credential).result.loss > 0  # the route goes through both
    assert "no invitation" in denied(first.address, x, y)
    assert "expired" in denied(first.address, x, y, cred=credential(expires_at=time.time() - 1)[0].credential)
    assert "owner" in denied(first.address, x, y, cred=credential(owner_key=RSAPrivateKey())[0].credential)
    observer = credential("observer")[0]
    assert "observer" in denied(first.address, x, y, cred=observer.credential)
    # a trainer may call stage 0 only: stage 1 takes hops from peers (refused before the payload is read)
    assert "trainer" in denied(second.address, x, y, stage=1, cred=trainer.credential)
    # someone who saw the trainer's invitation signs with its own key
    thief = Admission(RUN, "invite", OWNER, RSAPrivateKey(), invite)
    assert "not signed by the invitation's key" in denied(first.address, x, y, cred=thief.credential)
    # a credential from long ago (or a clock far off)
    stale = [(k, v if k != "x-swarm-time" else f"{time.time() - 600:.0f}")
             for k, v in trainer.credential(first.address)]
    assert "clock" in denied(first.address, x, y, cred=lambda address: stale)
    # a credential made out to another peer (a callee that kept its callers' credentials)
    elsewhere = trainer.credential("203.0.113.7:5000")
    assert "for this peer" in denied(first.address, x, y, cred=lambda address: elsewhere)
    # revoked: refused from the moment the stage knows
    gates[0].revoked = frozenset({invite.id})
    try:
        assert "revoked" in denied(first.address, x, y, cred=trainer.credential)
    finally:
        gates[0].revoked = frozenset()
    assert send(first.address, x, y, credential=trainer.credential).result.loss > 0  # still serving
    assert first.servicer.counters["denied"] >= 7


def test_an_open_stage_needs_no_credential():
    gate = Admission(RUN, "open", OWNER)
    assert gate.credential("127.0.0.1:5000") == [] and gate.caller_problem((), True, "127.0.0.1:5000") is None


# ---- live processes ----

def _run(*args, timeout=120):
    return subprocess.run([SP, *args], capture_output=True, text=True, timeout=timeout)


def _invite(tmp_path, owner_id, run_id, name, role, expires="1h"):
    ident = tmp_path / f"{name}.id"
    shown = _run("identity", "--identity-path", str(ident), "--json")
    assert shown.returncode == 0, shown.stderr
    member = json.loads(shown.stdout)["member_key"]
    made = _run("invite", "--identity-path", str(owner_id), "--run-id", run_id, "--member-key", member,
                "--role", role, "--expires", expires, "--json")
    assert made.returncode == 0, made.stderr
    return ident, json.loads(made.stdout)


@pytest.mark.slow
def test_an_invite_only_swarm_trains_and_shuts_out_the_uninvited(tmp_path, spawn, run_id, corpus):
    owner_id = tmp_path / "owner.id"
    shared = ["--preset", "tiny", "--stages", "2", "--batch-size", "4", "--microbatch-size", "2", "--max-steps", "3"]
    boot = spawn([SP, "bootstrap", "--run-id", run_id, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--json",
                  "--identity-path", str(owner_id), "--admission", "invite", "--update-period", "1", *shared])
    initial = json.loads(boot.wait_for_stdout(lambda out: out.strip(), timeout=60).splitlines()[0])["initial_peers"][0]
    common = ["--run-id", run_id, "--initial-peers", initial, "--update-period", "1", "--threads", "1"]
    invites = {name: _invite(tmp_path, owner_id, run_id, name, role)  # as a user does it: two commands each
               for name, role in [("trainer", "trainer"), ("eye", "observer")]}
    for k in (0, 1):  # the same, in-process
        ident = tmp_path / f"peer{k}.id"
        invite = issue_invite(load_identity(owner_id), run_id, member_key(ident).get_public_key(), "peer", IN_A_DAY)
        invites[f"peer{k}"] = ident, {"invite": invite.text, "id": invite.id}

    def args(name):
        ident, made = invites[name]
        return ["--identity-path", str(ident), "--invite", made["invite"]]

    # nobody gets into the DHT without an invitation
    uninvited = _run("inspect", "--run-id", run_id, "--initial-peers", initial, "--json")
    assert uninvited.returncode == 2 and "invitation" in uninvited.stderr, uninvited.stderr

    peers = [spawn([SP, "join", *common, "--stage", str(k), "--host", "127.0.0.1", "--throughput", "100", "--json",
                    *args(f"peer{k}")]) for k in (0, 1)]
    for peer in peers:
        wait_until(lambda p=peer: "peer ONLINE" in p.stderr or p.proc.poll() is not None, 120,
                   lambda p=peer: f"a peer ONLINE\n{p.stderr[-3000:]}")
        assert "peer ONLINE" in peer.stderr, peer.stderr[-3000:]
    trainer = spawn([SP, "train", *common, "--run-dir", str(tmp_path / "train"), "--no-progress", "--json",
                     *args("trainer")])
    wait_until(lambda: trainer.proc.poll() is not None, 180, lambda: f"the trainer's end\n{trainer.stderr[-3000:]}")
    assert trainer.proc.returncode == 0, trainer.stderr[-3000:]
    summary = json.loads(trainer.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["lost_microbatches"] == 0, summary

    def inspect():
        return _run("inspect", "--run-id", run_id, "--initial-peers", initial, "--json", *args("eye"))

    seen = inspect()
    assert seen.returncode == 0, seen.stderr
    assert sorted(s["stage"] for s in json.loads(seen.stdout)["stages"] for _ in s["peers"]) == [0, 1]

    # the owner revokes the observer: the DHT refuses it within a few update periods
    revoked = _run("revoke", "--run-id", run_id, "--initial-peers", initial, "--identity-path", str(owner_id),
                   invites["eye"][1]["id"], "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked"] == [invites["eye"][1]["id"]]
    wait_until(lambda: inspect().returncode != 0, 60, "the revoked observer refused by the DHT", period=1.0)
    for peer in peers:
        assert peer.stop(timeout=40) == 0, peer.stderr[-3000:]
