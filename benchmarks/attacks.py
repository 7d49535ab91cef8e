"""Attacks on a live local swarm, each next to a clean run: what happened, and the loss at the end.

Each run starts a bootstrap, two stage-0 peers, one stage-1 peer and a trainer as ``swarm-peer`` processes on
127.0.0.1 (``--preset tiny``, ``--steps`` steps) and mounts one attack from ``peer.attackers``:

* ``clean``: none (the reference);
* ``config-hijack``: before any peer joins, a stranger publishes the run's config record "earlier" than the owner
  did, with lr 1.0, a local file as dataset and another vocabulary, signed with its own key;
* ``state-takeover``: after a few steps a stranger with no stage record joins stage 0's collaboration, claims epoch
  10,000 and shares a state of all 0.5 at the top priority; then a newcomer joins stage 0.
* ``gradient-poison``: after a few steps a stranger with no stage record joins every gradient round of stage 0
  with gradients of 1e4 at weight 1e3, until the trainer ends.
* ``uninvited`` (the run is invite-only, every peer and the trainer invited by the owner): a stranger tries to
  join the DHT, to publish a config record and to send 20 hops to a stage-0 peer; an invited trainer's invitation
  sends one hop to stage 1 (only peers may); an invited observer reads the DHT, then the owner revokes it.
* ``loss-forger``: after a few steps a fake stage-0 peer with a valid stage record claiming 1e6 samples/s answers
  every microbatch at once with loss 1.0 and computes nothing (the trainer checks ``--check-fraction`` of its
  microbatches, 0.1 in every run here, the clean one too).
* ``exhaust``: after a few steps, three waves of 20 Hop calls to a stage-0 peer that never send a header, each with
  a call whose header declares a 1 GiB tensor.
* ``planted-checkpoint``: before the first stage-0 peer starts, its checkpoint directory holds a newest checkpoint
  that would create a marker file if it were unpickled with code execution allowed.

Outcome per attack: ``refused`` when every peer ignored it (the config: each peer and the trainer logged the
stranger's record as not the owner's; the state: no replica or newcomer reached the stranger's epoch; the
gradients: no round of the stranger's held a replica; uninvited: every attempt refused, the revoked observer
shut out; the forger: ``caught``, the trainer's checks caught it and no one else; exhaust: every idle call
cut off at the header deadline, every 1 GiB declaration refused, nothing lost; the planted checkpoint: the
marker never appeared and the peer refused the file), else ``effect``, with what was seen. Last line, a JSON
object: per attack its outcome, evidence and final loss (mean of the last 5 steps), and the clean run's.

    python benchmarks/attacks.py [--steps 30] [--only config-hijack loss-forger]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import tempfile
import time
from pathlib import Path

from peer.attackers import FAR_EPOCH, GradientPoisoner, LossForger, StateThief, plant_config
from peer.demo import Child

ATTACKS = ("clean", "config-hijack", "state-takeover", "gradient-poison", "uninvited", "loss-forger", "exhaust",
           "planted-checkpoint")
MID_RUN = ("state-takeover", "gradient-poison", "uninvited", "loss-forger", "exhaust")  # after 3 training steps
IDLE_CALLS, WAVES = 20, 3
CHECK_FRACTION = "0.1"


def losses(path: Path) -> list[float]:
    if not path.exists():
        return []
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]


def wait(predicate, timeout: float, what: str, period: float = 0.3):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"attacks.py: no {what} within {timeout:.0f} s")
        time.sleep(period)
    return value


def run(attack: str, args, root: Path) -> dict:
    logs = root / attack / "logs"
    logs.mkdir(parents=True)
    run_id = f"attacks-{attack}-{int(time.time())}"
    shared = {"preset": "tiny", "stages": 2, "batch_size": 8, "microbatch_size": 2}
    flags = ["--preset", "tiny", "--stages", "2", "--batch-size", "8", "--microbatch-size", "2", "--max-steps",
             str(args.steps), "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4"]
    owners = Invitations(root / attack, run_id) if attack == "uninvited" else None
    boot = Child("bootstrap", ["bootstrap", "--run-id", run_id, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--json",
                               "--update-period", "1", *flags, *(owners.bootstrap_flags() if owners else [])], logs)
    children, thief, probes = [boot], None, {}
    try:
        initial = json.loads(boot.proc.stdout.readline())["initial_peers"][0]
        common = ["--run-id", run_id, "--initial-peers", initial, "--threads", "1", "--update-period", "1"]
        if attack == "config-hijack":
            plant_config(initial, run_id, lr=1.0, dataset="/etc/hostname")
        extra, probes = plant_checkpoint(root / attack) if attack == "planted-checkpoint" else ([], {})

        def invited(name: str, role: str) -> list[str]:
            return owners.flags(name, role) if owners else []

        def join(stage: int, name: str) -> Child:
            child = Child(name, ["join", *common, "--stage", str(stage), "--host", "127.0.0.1", "--port", "0",
                                 "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--throughput", "100", "--matchmaking-time",
                                 "1", "--json", *invited(name, "peer"), *(extra if name == "stage0-a" else [])], logs)
            children.append(child)
            return child

        peers = [join(0, "stage0-a"), join(0, "stage0-b"), join(1, "stage1-a")]
        for p in peers:
            wait(lambda p=p: "peer ONLINE" in p.log.read_text() or not p.alive(), 300, f"{p.name} ONLINE")
        metrics = root / attack / "trainer" / "metrics.jsonl"
        trainer = Child("trainer", ["train", *common, "--in-flight", "4", "--run-dir", str(metrics.parent),
                                    "--check-fraction", CHECK_FRACTION,
                                    "--eval-interval", "0", "--log-interval", "1", "--no-progress", "--json",
                                    *invited("trainer", "trainer")], logs)
        children.append(trainer)
        if attack in MID_RUN:
            wait(lambda: len(losses(metrics)) >= 3 or not trainer.alive(), 300, "3 training steps")
            thief, probes = mount(attack, initial, run_id, shared, owners, peers, join)

        wait(lambda: not trainer.alive(), 900, "the trainer's end", period=1.0)
        summary = trainer.last_json() or {}
        outcome, evidence = judge(attack, {c.name: c.log.read_text() for c in children}, thief, probes, summary)
        curve = losses(metrics)
        return {"attack": attack, "outcome": outcome, "evidence": evidence, "steps": summary.get("steps"),
                "checks": summary.get("checks"), "tokens_per_s": summary.get("tokens_per_s"),
                "lost_microbatches": summary.get("lost_microbatches"),
                "final_loss": round(sum(curve[-5:]) / len(curve[-5:]), 4) if curve else None}
    finally:
        if thief is not None:
            thief.close()
        for child in children:
            child.signal(signal.SIGTERM)
        for child in children:
            try:
                child.proc.wait(timeout=40)
            except Exception:  # noqa: BLE001 - a straggler: its whole group goes
                child.signal(signal.SIGKILL)
            child.close()


def mount(attack: str, initial: str, run_id: str, shared: dict, owners, peers: list, join):
    """Start an attack in the middle of the run: ``(stranger, probes)``."""
    if attack == "gradient-poison":
        return GradientPoisoner(initial, run_id, 0, shared, group_size=3), {}
    if attack == "uninvited":
        return None, probe_uninvited(owners, initial, run_id, peers[0].log.read_text(), peers[2].log.read_text())
    if attack == "loss-forger":
        return LossForger(initial, run_id, stage=0, loss=1.0), {}
    if attack == "exhaust":
        address = re.search(r"peer ONLINE at (\S+):", peers[0].log.read_text()).group(1)
        return None, probe_exhaustion(address, run_id)
    thief = StateThief(initial, run_id, 0, shared)
    wait(thief.declared, 60, "the thief's declaration")
    newcomer = join(0, "stage0-newcomer")
    wait(lambda: "peer ONLINE" in newcomer.log.read_text() or not newcomer.alive(), 300, "the newcomer")
    peers.append(newcomer)
    return thief, {}


def judge(attack: str, texts: dict[str, str], thief, probes: dict, summary: dict) -> tuple[str, dict]:
    """``(outcome, evidence)`` of an attack from every process's log (and the probes' and trainer's results)."""
    if attack == "loss-forger":
        caught = summary.get("distrusted") == [thief.address]
        return ("caught" if caught else "effect"), {
            "forger": thief.address, "hops_to_the_forger": thief.hops, "distrusted": summary.get("distrusted"),
            "catches_logged": texts["trainer"].count("checked result: the route through")}
    if attack == "gradient-poison":
        stranger = thief.peer_id
        turned = sorted(n for n, t in texts.items() if stranger in t and "gradient round" in t)
        joined = [g for g in thief.groups if g > 1]
        evidence = {"stranger_rounds": len(thief.groups) + thief.failed, "stranger_rounds_with_a_replica": len(joined),
                    "replicas_that_refused_it": turned}
        return ("refused" if not joined else "effect"), evidence
    if attack == "uninvited":
        return ("refused" if probes and all(probes.values()) else "effect"), probes
    if attack == "exhaust":
        refused = probes["idle_codes"] == {"DEADLINE_EXCEEDED": IDLE_CALLS * WAVES} and \
            set(probes["big_header_codes"]) <= {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}
        return ("refused" if refused and summary.get("lost_microbatches") == 0 else "effect"), probes
    if attack == "planted-checkpoint":
        evidence = {"marker_created": Path(probes["marker"]).exists(), "refusal_logged": "refused checkpoint" in
                    texts["stage0-a"]}
        return ("refused" if evidence["refusal_logged"] and not evidence["marker_created"] else "effect"), evidence
    if attack == "config-hijack":  # each of the 3 peers and the trainer logged the stranger's record as ignored
        ignored = sorted(n for n, t in texts.items() if n != "bootstrap" and "not by the run's owner" in t)
        return ("refused" if len(ignored) == 4 else "effect"), {"ignored_by": ignored}
    if attack == "state-takeover":
        jumped = [n for n, t in texts.items() if re.search(rf"collaboration at {FAR_EPOCH}|epoch {FAR_EPOCH}", t)]
        online = re.search(r"peer ONLINE.*epoch (\d+)", texts["stage0-newcomer"])
        epoch = int(online.group(1)) if online else None
        evidence = {"replicas_at_the_strangers_epoch": jumped, "newcomer_epoch": epoch,
                    "newcomer_turned_the_stranger_away": f"from {thief.peer_id}" in texts["stage0-newcomer"]}
        return ("refused" if not jumped and epoch is not None and epoch < FAR_EPOCH else "effect"), evidence
    return "none", {}


class Invitations:
    """The owner's identity and an invitation for each process of an invite-only run (``dht.admission``)."""

    def __init__(self, root: Path, run_id: str):
        from dht.owner import load_or_create_identity

        self.root, self.run_id = root, run_id
        self.owner_path = root / "owner.id"
        self.owner_key = load_or_create_identity(self.owner_path)

    def bootstrap_flags(self) -> list[str]:
        return ["--identity-path", str(self.owner_path), "--admission", "invite"]

    def invite(self, name: str, role: str, seconds: float = 3600.0):
        from dht.admission import issue_invite
        from dht.node import member_key

        path = self.root / f"{name}.id"
        return path, issue_invite(self.owner_key, self.run_id, member_key(path).get_public_key(), role,
                                  time.time() + seconds)

    def flags(self, name: str, role: str) -> list[str]:
        path, invite = self.invite(name, role)
        return ["--identity-path", str(path), "--invite", invite.text]


def probe_uninvited(owners: Invitations, initial: str, run_id: str, stage0_log: str, stage1_log: str) -> dict:
    """What a stranger, a trainer's invitation and a revoked observer get from an invite-only run: per probe, True
    when it was refused (``observer_read_before_revocation``: True when the invited observer could read)."""
    import grpc

    from dht.admission import Admission, InviteAuthorizer
    from dht.bootstrap import SelfAdmission
    from dht.errors import ControlPlaneError
    from dht.node import SwarmNode, member_key
    from dht.owner import peer_id_of
    from dht.revocations import publish_revocation

    def endpoint(log: str) -> str:
        return re.search(r"peer ONLINE at (\S+):", log).group(1)

    owner = peer_id_of(owners.owner_key.get_public_key())
    probes = {}
    try:
        SwarmNode.start(run_id, [initial], client_mode=True).shutdown()
        probes["dht_join_refused"] = False
    except ControlPlaneError:
        probes["dht_join_refused"] = True
    try:
        plant_config(initial, run_id, lr=1.0)
        probes["config_record_refused"] = False
    except ControlPlaneError:
        probes["config_record_refused"] = True
    codes = [hop_code(endpoint(stage0_log), None) for _ in range(20)]
    probes["stranger_hops_denied"] = all(c == grpc.StatusCode.PERMISSION_DENIED for c in codes)
    key_path, invite = owners.invite("trainer-2", "trainer")
    trainer = Admission(run_id, "invite", owner, member_key(key_path), invite)
    stage1 = endpoint(stage1_log)
    probes["trainer_hop_to_stage1_denied"] = \
        hop_code(stage1, trainer.credential(stage1)) == grpc.StatusCode.PERMISSION_DENIED
    eye_path, eye = owners.invite("eye", "observer")
    eye_key = member_key(eye_path)

    def observer_reads() -> bool:
        try:
            with SwarmNode.start(run_id, [initial], client_mode=True, keys=[eye_key],
                                 authorizer=InviteAuthorizer(eye_key, eye, owner)) as node:
                return node.dht.get(f"{run_id}_config", latest=True) is not None
        except ControlPlaneError:
            return False

    probes["observer_read_before_revocation"] = observer_reads()
    access = SelfAdmission(owners.owner_key, member_key(None), run_id, owner, seconds=600)
    with SwarmNode.start(run_id, [initial], client_mode=True, keys=[access.admission.key],
                         authorizer=access.authorizer) as node:
        publish_revocation(node, owners.owner_key, owner, [eye.id])
    deadline = time.monotonic() + 60
    while observer_reads() and time.monotonic() < deadline:
        time.sleep(1.0)
    probes["revoked_observer_refused"] = not observer_reads()
    return probes


MARKER = "planted-checkpoint-ran"


class _Planted:
    """Unpickled with code execution allowed, this would create the marker file (a harmless stand-in for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def plant_checkpoint(root: Path) -> tuple[list[str], dict]:
    """A checkpoint directory whose newest stage-0 checkpoint is a pickled payload: the flags that use it, and
    where the payload's marker would appear."""
    import torch

    directory = root / "planted" / "stage-0"
    directory.mkdir(parents=True)
    torch.save({"model": _Planted(root / MARKER)}, directory / "step-00000100.pt")
    return ["--checkpoint-dir", str(root / "planted")], {"marker": str(root / MARKER)}


def probe_exhaustion(address: str, run_id: str) -> dict:
    """Waves of Hop calls that never send a header, each with a call whose header declares a 1 GiB tensor: the
    status codes they got."""
    import collections
    import threading

    import grpc

    from peer.rpc import stage_pb2 as pb

    header = pb.MicrobatchHeader(run_id=run_id, microbatch_id="big", stage=0, budget_s=5)
    huge = pb.Tensor(name="input_ids", dtype=pb.INT64, shape=[1 << 27], total_bytes=1 << 30, chunk_index=0,
                     chunk_count=1 << 14, data=bytes(64))
    big = pb.HopRequest(header=header, tensors=[huge]).SerializeToString()
    idle_codes, big_codes = collections.Counter(), collections.Counter()
    with grpc.insecure_channel(address) as channel:
        hop = channel.stream_stream("/swarm.v1.Stage/Hop")
        for _ in range(WAVES):
            release = threading.Event()

            def idle(release=release):
                release.wait(60)  # sends nothing until released
                yield from ()

            calls = [hop(idle(), timeout=30) for _ in range(IDLE_CALLS)]
            try:
                list(hop(iter([big]), timeout=10))
                big_codes["OK"] += 1
            except grpc.RpcError as e:
                big_codes[e.code().name] += 1
            idle_codes.update(call.code().name for call in calls)  # each waits for its call's end
            release.set()
    return {"address": address, "idle_codes": dict(idle_codes), "big_header_codes": dict(big_codes)}


def hop_code(address: str, metadata):
    """The status of a one-message hop to ``address`` (its payload is never read when the call is refused)."""
    import grpc

    from peer.rpc import stage_pb2 as pb

    header = pb.MicrobatchHeader(run_id="x", microbatch_id="probe", stage=0, budget_s=5)
    request = pb.HopRequest(header=header).SerializeToString()
    with grpc.insecure_channel(address) as channel:
        try:
            list(channel.stream_stream("/swarm.v1.Stage/Hop")(iter([request]), timeout=10, metadata=metadata))
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", choices=ATTACKS[1:], nargs="+", help="these attacks (and the clean run)")
    p.add_argument("--out", type=Path, default=None, help="where the runs' logs go (default: a temporary directory)")
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="attacks-"))
    results = []
    for attack in ("clean", *args.only) if args.only else ATTACKS:
        result = run(attack, args, root)
        results.append(result)
        print(json.dumps(result), flush=True)
    clean = results[0]["final_loss"]
    for r in results[1:]:
        r["clean_final_loss"] = clean
    print(json.dumps({"benchmark": "attacks", "steps": args.steps, "attacks": results[1:], "clean_final_loss": clean,
                      "logs": str(root)}))


if __name__ == "__main__":
    main()
