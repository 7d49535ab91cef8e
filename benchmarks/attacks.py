"""Attacks on a live local swarm, each next to a clean run: what happened, and the loss at the end.

Each run starts a bootstrap, two stage-0 peers, one stage-1 peer and a trainer as ``swarm-peer`` processes on
127.0.0.1 (``--preset tiny``, ``--steps`` steps) and mounts one attack from ``peer.attackers``:

* ``clean``: none (the reference);
* ``config-hijack``: before any peer joins, a stranger publishes the run's config record "earlier" than the owner
  did, with lr 1.0, a local file as dataset and another vocabulary, signed with its own key;
* ``state-takeover``: after a few steps a stranger with no stage record joins stage 0's collaboration, claims epoch
  10,000 and shares a state of all 0.5 at the top priority; then a newcomer joins stage 0.

Outcome per attack: ``refused`` when every peer ignored it (the config: each peer and the trainer logged the
stranger's record as not the owner's; the state: no replica or newcomer reached the stranger's epoch), else
``effect``, with what was seen. Last line, a JSON object: per attack its outcome, evidence and final loss (mean
of the last 5 steps), and the clean run's.

    python benchmarks/attacks.py [--steps 30] [--only config-hijack]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import tempfile
import time
from pathlib import Path

from peer.attackers import FAR_EPOCH, StateThief, plant_config
from peer.demo import Child

ATTACKS = ("clean", "config-hijack", "state-takeover")


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
    boot = Child("bootstrap", ["bootstrap", "--run-id", run_id, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--json",
                               "--update-period", "1", *flags], logs)
    children, thief = [boot], None
    try:
        initial = json.loads(boot.proc.stdout.readline())["initial_peers"][0]
        common = ["--run-id", run_id, "--initial-peers", initial, "--threads", "1", "--update-period", "1"]
        if attack == "config-hijack":
            plant_config(initial, run_id, lr=1.0, dataset="/etc/hostname")

        def join(stage: int, name: str) -> Child:
            child = Child(name, ["join", *common, "--stage", str(stage), "--host", "127.0.0.1", "--port", "0",
                                 "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--throughput", "100", "--matchmaking-time",
                                 "1", "--json"], logs)
            children.append(child)
            return child

        peers = [join(0, "stage0-a"), join(0, "stage0-b"), join(1, "stage1-a")]
        for p in peers:
            wait(lambda p=p: "peer ONLINE" in p.log.read_text() or not p.alive(), 300, f"{p.name} ONLINE")
        metrics = root / attack / "trainer" / "metrics.jsonl"
        trainer = Child("trainer", ["train", *common, "--in-flight", "4", "--run-dir", str(metrics.parent),
                                    "--eval-interval", "0", "--log-interval", "1", "--no-progress", "--json"], logs)
        children.append(trainer)
        if attack == "state-takeover":
            wait(lambda: len(losses(metrics)) >= 3 or not trainer.alive(), 300, "3 training steps")
            thief = StateThief(initial, run_id, 0, shared)
            wait(thief.declared, 60, "the thief's declaration")
            newcomer = join(0, "stage0-newcomer")
            wait(lambda: "peer ONLINE" in newcomer.log.read_text() or not newcomer.alive(), 300, "the newcomer")
            peers.append(newcomer)
        wait(lambda: not trainer.alive(), 900, "the trainer's end", period=1.0)
        summary = trainer.last_json() or {}
        outcome, evidence = judge(attack, {c.name: c.log.read_text() for c in children}, thief)
        curve = losses(metrics)
        return {"attack": attack, "outcome": outcome, "evidence": evidence, "steps": summary.get("steps"),
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


def judge(attack: str, texts: dict[str, str], thief: StateThief | None) -> tuple[str, dict]:
    """``(outcome, evidence)`` of an attack from every process's log."""
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", choices=ATTACKS[1:], help="one attack (and the clean run)")
    p.add_argument("--out", type=Path, default=None, help="where the runs' logs go (default: a temporary directory)")
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="attacks-"))
    results = []
    for attack in ("clean", args.only) if args.only else ATTACKS:
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
