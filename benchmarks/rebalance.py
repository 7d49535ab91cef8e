"""Adaptive rebalancing on one machine: does moving ``--stage auto`` peers to the bottleneck pay?

A 2-stage swarm on 127.0.0.1: stage 1 is served by one pinned peer on an emulated slow device
(``--compute-slowdown``), three ``--stage auto`` peers start crowded into stage 0 (``--initial-stage
0``), and a trainer trains. The peers check every ``--period`` seconds (jittered); the first check
comes after the trainer has run a while, so the figures hold a "before" and an "after":

* trainer tokens/s before the first move and after the last one (from its per-step metrics), and
  their ratio (the issue's target: >= 1.3);
* time to rebalance: from the trainer's start to the last move's ONLINE, and each move's own time
  (drain, leave, build, download the new stage's state, ONLINE);
* moves, moves back (a peer returning to a stage it left: the target is 0), lost microbatches (0).

Last line: a JSON object.

    python benchmarks/rebalance.py [--preset tiny] [--max-tokens 240000] [--period 30] [--slowdown 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from peer.processes import stop_all
from swarm_vs_baseline import SP, wait_line  # benchmarks/ is on the path when a script runs from it



def tokens_per_s(rows: list[dict], start: float, end: float) -> float | None:
    """Median tokens/s of the steps that ended inside [start, end] (wall-clock time)."""
    inside = [r["tokens_per_s"] for r in rows if start <= r["time"] <= end and r.get("tokens_per_s")]
    return round(statistics.median(inside), 1) if inside else None


def run(args, tmp: Path) -> dict:
    shared = ["--preset", args.preset, "--stages", "2", "--batch-size", "8", "--microbatch-size", "2",
              "--max-steps", "100000", "--decay-steps", "100000", "--warmup-steps", "2", "--lr", "2e-3"]
    procs: list[subprocess.Popen] = []
    try:
        boot_out = tmp / "boot.out"
        procs.append(subprocess.Popen([*SP, "bootstrap", "--run-id", "bench-rebalance", "--host-maddrs",
                                       "/ip4/127.0.0.1/tcp/0", "--json", *shared], stdout=open(boot_out, "w"),
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        initial = json.loads(wait_line(boot_out, "initial_peers", procs[0]).splitlines()[0])["initial_peers"][0]
        common = ["--run-id", "bench-rebalance", "--initial-peers", initial, "--threads", "1", "--update-period", "2"]
        serve = ["--host", "127.0.0.1", "--json"]
        peers = {"pinned": ["--stage", "1", "--compute-slowdown", str(args.slowdown)]}
        for i in range(3):
            peers[f"auto{i}"] = ["--stage", "auto", "--initial-stage", "0", "--rebalance-period", str(args.period),
                                 "--rebalance-cooldown", str(10 * args.period)]
        logs = {}
        for name, extra in peers.items():
            logs[name] = (tmp / f"{name}.out", tmp / f"{name}.err")
            procs.append(subprocess.Popen([*SP, "join", *common, *serve, *extra], stdout=open(logs[name][0], "w"),
                                          stderr=open(logs[name][1], "w"), start_new_session=True))
        for i, name in enumerate(peers):
            wait_line(logs[name][1], "peer ONLINE", procs[1 + i])
        started = time.time()
        out = tmp / "train.out"
        trainer = subprocess.run([*SP, "train", *common, "--in-flight", "4", "--run-dir", str(tmp / "train"),
                                  "--max-tokens", str(args.max_tokens), "--eval-interval", "0", "--log-interval", "1",
                                  "--no-progress", "--json"], stdout=open(out, "w"), stderr=subprocess.DEVNULL,
                                 timeout=3600)
        if trainer.returncode != 0:
            raise SystemExit(f"trainer failed ({trainer.returncode})")
        ended = time.time()
        summary = json.loads(out.read_text().strip().splitlines()[-1])
    finally:  # peers leave gracefully, the bootstrap last; SIGKILL to the process group of a straggler
        stop_all(reversed(procs), 60, term_group=False)
    moves = []
    for name in peers:
        lines = logs[name][0].read_text().strip().splitlines()
        end = json.loads(lines[-1]) if lines else {}
        moves += [{"peer": name, **m} for m in end.get("moves", [])]
    rows = [json.loads(line) for line in (tmp / "train" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train" and "time" in r]
    first = min((m["at"] for m in moves), default=None)
    last = max((m["at"] + m["took_s"] for m in moves), default=None)
    before = tokens_per_s(rows, started, first) if first else tokens_per_s(rows, started, ended)
    after = tokens_per_s(rows, last + args.period / 2, ended) if last else None
    left = {(m["peer"], m["from"]) for m in moves}
    return {
        "preset": args.preset, "slowdown": args.slowdown, "period_s": args.period,
        "tokens_per_s_before": before, "tokens_per_s_after": after,
        "ratio": round(after / before, 3) if before and after else None, "target_ratio": 1.3,
        "time_to_rebalance_s": round(last - started, 1) if last else None,
        "move_s": [m["took_s"] for m in moves], "moves": len(moves),
        "moves_drained": sum(1 for m in moves if m["drained"]), "moves_state_from": [m["state_from"] for m in moves],
        "moves_back": sum(1 for m in moves if (m["peer"], m["to"]) in left),
        "lost_microbatches": summary["lost_microbatches"], "steps": summary["steps"],
        "train_time_s": round(ended - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-tokens", type=int, default=240_000, help="the trainer's budget (128 tokens per sequence)")
    p.add_argument("--period", type=float, default=30.0, help="--rebalance-period of the auto peers (s)")
    p.add_argument("--slowdown", type=float, default=3.0, help="--compute-slowdown of the pinned stage-1 peer")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
