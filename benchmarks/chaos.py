"""Chaos harness: a local swarm trains while stage peers are killed and replaced; nothing may be lost.

Starts a bootstrap, S stages x R stage peers and T trainers as `swarm-peer` processes on
127.0.0.1, then, while the trainers run, kills a random stage peer every ``--kill-every``
seconds (SIGKILL or SIGTERM, chosen by ``--seed``) and starts a replacement for the same
stage ``--restart-after`` seconds later. Then it runs the same harness without faults, same
seed and steps. Last line, a JSON object: microbatches sent / completed / retried / lost,
optimizer steps per stage, the longest recovery, kills, whether the replicas of each stage
hold equal parameters at the end, and the final loss of both runs.

    python benchmarks/chaos.py [--stages 2] [--replicas 3] [--kill-every 20] [--steps 60]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import signal
import tempfile
import time
from pathlib import Path

import torch

from peer.demo import Child

logger = logging.getLogger("chaos")


def losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def run(args, tmp: Path, faults: bool) -> dict:
    name = "chaos" if faults else "calm"
    logs = tmp / name / "logs"
    logs.mkdir(parents=True)
    run_id = f"{name}-{args.seed}"
    shared = ["--preset", args.preset, "--stages", str(args.stages), "--max-steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--microbatch-size", str(args.microbatch_size),
              "--warmup-steps", "5", "--lr", "2e-3", "--min-lr", "2e-4", "--seed", str(args.seed)]
    boot = Child("bootstrap", ["bootstrap", "--run-id", run_id, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--json",
                               "--update-period", "2", *shared], logs)
    children = [boot]
    rng = random.Random(args.seed)
    counter = itertools.count()
    try:
        initial = json.loads(boot.proc.stdout.readline())["initial_peers"][0]
        common = ["--run-id", run_id, "--initial-peers", initial, "--threads", "1", "--update-period", "2"]

        def start_peer(stage: int) -> Child:
            i = next(counter)
            peer = Child(f"stage{stage}-peer{i}", [
                "join", *common, "--stage", str(stage), "--host", "127.0.0.1", "--port", "0",
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--throughput", "100", "--matchmaking-time", "1",
                "--attempt-timeout", "5", "--checkpoint-dir", str(tmp / name / f"ckpt-{i}"), "--json"], logs)
            peer.stage, peer.index = stage, i
            return peer

        peers = [start_peer(k) for k in range(args.stages) for _ in range(args.replicas)]
        children += peers
        _wait_online(peers)
        trainers = [Child(f"trainer{t}", ["train", *common, "--trainer-index", str(t), "--num-trainers",
                                          str(args.trainers), "--in-flight", "4", "--eval-interval", "0",
                                          "--run-dir", str(tmp / name / f"trainer{t}"), "--no-progress", "--json"],
                          logs) for t in range(args.trainers)]
        children += trainers
        kills, told, pending, next_kill = [], set(), [], time.time() + args.kill_every  # told: signalled peers
        metrics = [tmp / name / f"trainer{t}" / "metrics.jsonl" for t in range(args.trainers)]
        progress, progressed = -1, time.time()
        while any(t.alive() for t in trainers):
            now = time.time()
            written = sum(m.stat().st_size for m in metrics if m.exists())
            if written != progress:
                progress, progressed = written, now
            elif now - progressed > args.stall_timeout:  # the finally below stops every process
                raise SystemExit(f"{name}: no trainer progress for {args.stall_timeout:.0f} s; see {logs}")
            if faults and now >= next_kill:
                candidates = [p for p in peers if p.alive() and p.name not in told]
                if not candidates:
                    next_kill = now + args.kill_every
                    continue
                victim = rng.choice(candidates)
                sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                told.add(victim.name)  # a peer sent SIGTERM may still be leaving: never picked again
                victim.signal(sig)  # SIGKILL takes the peer's whole process group, as a vanished machine would
                kills.append({"peer": victim.name, "signal": signal.Signals(sig).name, "at_s": round(now, 1)})
                logger.warning("killed %s with %s", victim.name, signal.Signals(sig).name)
                pending.append((now + args.restart_after, victim.stage))
                next_kill = now + args.kill_every
            for due, stage in [p for p in pending if p[0] <= now]:
                pending.remove((due, stage))
                replacement = start_peer(stage)
                peers.append(replacement)
                children.append(replacement)
                logger.warning("started %s", replacement.name)
            time.sleep(0.2)
        summaries = [t.last_json() for t in trainers]
        # the replicas at the end: every peer not told to go, once the replacements still starting have joined
        deadline = time.time() + 180
        while time.time() < deadline and any(p.alive() and "peer ONLINE" not in p.log.read_text()
                                             for p in peers if p.name not in told):
            time.sleep(0.3)
        alive = [p for p in peers if p.alive() and p.name not in told]
        time.sleep(3)  # the last averaging rounds and resyncs settle
        ends = _stop_replicas(alive)
        return _report(args, tmp / name, summaries, alive, ends, kills)
    finally:
        for child in children:
            child.signal(signal.SIGKILL)


def _stop_replicas(alive) -> dict:
    """SIGTERM every peer at once, then each one's last JSON line (its leave summary) by name."""
    for p in alive:
        p.proc.send_signal(signal.SIGTERM)
    ends = {}
    for p in alive:
        p.proc.wait(timeout=60)
        ends[p.name] = p.last_json()
    return ends


def _wait_online(peers, timeout=300) -> None:
    deadline = time.time() + timeout
    for p in peers:
        while "peer ONLINE" not in p.log.read_text():
            if not p.alive() or time.time() > deadline:
                raise SystemExit(f"{p.name} did not come online; see {p.log}")
            time.sleep(0.3)


def _report(args, root: Path, summaries, alive, ends, kills) -> dict:
    trainer = summaries[0] or {}
    equal, spread = {}, {}
    for stage in range(args.stages):
        states = []
        for p in alive:
            files = sorted((root / f"ckpt-{p.index}" / f"stage-{stage}").glob("step-*.pt"))
            if p.stage == stage and files:
                states.append(torch.load(files[-1], weights_only=False))
        # the tests' tolerance: all-reduce rounding magnified by Adam, far below one step of difference
        equal[stage] = len({s["epoch"] for s in states}) <= 1 and all(
            torch.allclose(states[0]["model"][n], s["model"][n], rtol=1e-4, atol=5e-5)
            for s in states[1:] for n in states[0]["model"])
        spread[stage] = max((float((states[0]["model"][n] - s["model"][n]).abs().max())
                             for s in states[1:] for n in states[0]["model"]), default=0.0)
    curve = losses(root / "trainer0" / "metrics.jsonl")
    return {
        "microbatches_sent": trainer.get("microbatches_sent"), "completed": trainer.get("microbatches"),
        "retried": trainer.get("retries"), "failures": trainer.get("failures"),
        "lost": trainer.get("lost_microbatches"), "trainer_crashes": sum(1 for s in summaries if s is None),
        "steps": trainer.get("steps"), "max_recovery_s": trainer.get("max_recovery_s"),
        "optimizer_steps_per_stage": {k: max((e["epoch"] for n, e in ends.items() if e and e.get("stage") == k),
                                             default=None) for k in range(args.stages)},
        "replicas_equal": equal, "replica_max_abs_diff": spread, "kills": len(kills), "kill_log": kills,
        "final_loss": round(sum(curve[-5:]) / len(curve[-5:]), 4) if curve else None,
        "train_time_s": trainer.get("train_time_s"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--trainers", type=int, default=1)
    p.add_argument("--steps", type=int, default=150, help="trainer steps (150: about 3 minutes here)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--microbatch-size", type=int, default=4)
    p.add_argument("--kill-every", type=float, default=20.0)
    p.add_argument("--restart-after", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stall-timeout", type=float, default=180.0,
                   help="give up (exit status 1) when no trainer logged a metric for this many seconds")
    p.add_argument("--workdir", type=Path,
                   help="keep logs, checkpoints and metrics here (default: a temporary directory)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        chaos = run(args, work, faults=True)
        calm = run(args, work, faults=False)
    ratio = chaos["final_loss"] / calm["final_loss"] if chaos["final_loss"] and calm["final_loss"] else None
    print(json.dumps({"benchmark": "chaos", "stages": args.stages, "replicas": args.replicas,
                      "kill_every_s": args.kill_every, "restart_after_s": args.restart_after, "seed": args.seed,
                      "faults": chaos, "fault_free": {k: calm[k] for k in ("steps", "final_loss", "train_time_s",
                                                                           "replicas_equal", "lost", "retried")},
                      "final_loss_ratio": round(ratio, 4) if ratio else None,
                      "targets": {"lost": 0, "trainer_crashes": 0, "replicas_equal": True,
                                  "final_loss_within": 0.05}}))


if __name__ == "__main__":
    main()
