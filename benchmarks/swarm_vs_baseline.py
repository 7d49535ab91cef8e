"""SWARM on one machine against the single-process baseline: same model, data and global batch.

(a) ``swarm-peer baseline`` with ``--baseline-threads`` torch threads (default 2: this machine's
cores); (b) a 2-stage swarm on 127.0.0.1: a bootstrap, one ``join`` per stage (one torch thread
each: the two cores), one ``train``
keeping K microbatches in flight, once per partition scheme (``even`` layers, ``balanced``
compute). Figures: tokens/s of each over the whole training loop, their ratio, the training
loss at equal tokens (mean of the last 5 steps), and per stage the time its compute thread
was busy (forward, backward, update) as a fraction of the training time, and how many
backwards recomputed their forward after an update. Last line: a JSON object.

    python benchmarks/swarm_vs_baseline.py [--preset llama-14m] [--steps 30] [--in-flight 4] [--batch-size 32]
                                           [--device cpu|cuda] [--baseline-threads 2]

With ``--device cuda`` both stage peers share the one GPU (and the baseline uses it alone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from peer.baseline import train_baseline
from peer.config import load_config

SP = [sys.executable, "-m", "peer.cli"]


def last_losses(path: Path, n: int = 5) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"][-n:]
    return sum(losses) / len(losses)


def wait_line(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[3]} exited early:\n{text[-2000:]}")
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {needle!r} in {path}")


def run_swarm(shared: list[str], tmp: Path, name: str, in_flight: int, device: str = "cpu") -> dict:
    procs = []
    run = f"bench-{name}"
    try:
        boot_out = tmp / f"{name}-boot.out"
        boot = subprocess.Popen([*SP, "bootstrap", "--run-id", run, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--json",
                                 *shared], stdout=open(boot_out, "w"), stderr=subprocess.DEVNULL)
        procs.append(boot)
        initial = json.loads(wait_line(boot_out, "initial_peers", boot).splitlines()[0])["initial_peers"][0]
        common = ["--run-id", run, "--initial-peers", initial, "--threads", "1", "--update-period", "2"]
        joins = []
        for stage in (0, 1):
            err = tmp / f"{name}-join{stage}.err"
            joins.append(tmp / f"{name}-join{stage}.out")
            procs.append(subprocess.Popen([*SP, "join", *common, "--stage", str(stage), "--host", "127.0.0.1",
                                           "--throughput", "100", "--device", device, "--json"],
                                          stdout=open(joins[-1], "w"), stderr=open(err, "w")))
            wait_line(err, "peer ONLINE", procs[-1])
        out = tmp / f"{name}-train.out"
        trainer = subprocess.run([*SP, "train", *common, "--in-flight", str(in_flight), "--run-dir", str(tmp / name),
                                  "--eval-interval", "0", "--log-interval", "1", "--no-progress", "--json"],
                                 stdout=open(out, "w"), stderr=subprocess.DEVNULL, timeout=1800)
        if trainer.returncode != 0:
            raise SystemExit(f"trainer failed ({trainer.returncode})")
        summary = json.loads(out.read_text().strip().splitlines()[-1])
        summary["loss_last5"] = last_losses(tmp / name / "metrics.jsonl")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
    # each stage's busy time on its compute thread over the run, and its recomputed forwards
    summary["stages"] = []
    for path in joins:
        lines = path.read_text().strip().splitlines()
        end = json.loads(lines[-1]) if lines else {}
        if "compute_s" not in end:  # the peer was killed before it could print its summary
            summary["stages"].append(None)
            continue
        summary["stages"].append({"busy_fraction": round(sum(end["compute_s"].values()) / summary["train_time_s"], 3),
                                  "compute_s": end["compute_s"], "recomputed": end["recomputed"]})
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-14m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="global batch in sequences (microbatches of 8)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--baseline-threads", type=int, default=2, help="torch threads of the baseline (default 2)")
    args = p.parse_args()
    fields = dict(preset=args.preset, stages=2, max_steps=args.steps, warmup_steps=5, lr=2e-3, min_lr=2e-4,
                  batch_size=args.batch_size, microbatch_size=8)
    shared = [x for k, v in fields.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    torch.set_num_threads(args.baseline_threads)  # the baseline trains in this process
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = train_baseline(load_config({**fields, "device": args.device, "eval_interval": 0, "log_interval": 1,
                                           "progress": False, "run_dir": tmp / "baseline"}))
        base_tps = base["tokens"] / base["train_time_s"]
        base_loss = last_losses(tmp / "baseline" / "metrics.jsonl")
        print(f"baseline: {base_tps:,.0f} tokens/s, loss {base_loss:.3f}", flush=True)
        results = {}
        for partition in ("even", "balanced"):
            swarm = run_swarm([*shared, "--partition", partition], tmp, partition, args.in_flight, args.device)
            results[partition] = {"tokens_per_s": round(swarm["tokens_per_s"], 1),
                                  "ratio": round(swarm["tokens_per_s"] / base_tps, 3),
                                  "loss_last5": round(swarm["loss_last5"], 4), "retries": swarm["retries"],
                                  "stages": swarm["stages"]}
            print(f"swarm ({partition}): {swarm['tokens_per_s']:,.0f} tokens/s "
                  f"(ratio {results[partition]['ratio']:.2f}), loss {swarm['loss_last5']:.3f}", flush=True)
    print(json.dumps({"benchmark": "swarm_vs_baseline", "preset": args.preset, "steps": args.steps,
                      "device": args.device, "tokens_per_step": args.batch_size * 128, "in_flight": args.in_flight,
                      "baseline_threads": args.baseline_threads,
                      "swarm_threads_per_stage": 1, "baseline_tokens_per_s": round(base_tps, 1),
                      "baseline_loss_last5": round(base_loss, 4), "swarm": results, "target_ratio": 0.8}))


if __name__ == "__main__":
    main()
