"""Calibration of the simulator against the battle test: predict the swarm's tokens/s in the battle test's emulated
worlds (README, "Battle test") and compare with what the battle test measured.

The inputs are the battle test's setup, nothing fitted to its swarm figures: `llama-14m` (vocabulary 8,192, 128-token
sequences, `balanced` partition), 2 stages x 2 peers, 16 x 128 tokens per step, 2 per microbatch, 8 in flight,
`--matchmaking-time 1`, rebalancing period 20 s (cooldown 60 s), codec none; the links of each scenario (lan: no
shaping, taken as 10 Gbit/s and 0.05 ms; wan: 100 Mbit/s, 25 ms; uneven-links: each machine drawn as the battle test
draws them, seed 0); the devices: an emulated device at `--compute-slowdown 8` runs the *whole* model's
forward+backward at 161.6 tokens/s (the battle test's measured single-device baseline), so its FLOP/s are
161.6 x 6 x the model's multiply-adds per token, and a device slowed 2x or 4x more (uneven-compute) has half or a
quarter of that. Measured figures: the README's battle table (`--scenario all`, 2 cores). Each prediction is the
simulated tokens/s over the battle test's window (30 s; uneven-compute 60 s) from the first optimizer step.

    PYTHONPATH=. .venv/bin/python benchmarks/simulate_calibration.py        # seconds; last line JSON
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peer.shapes import PRESETS, stage_costs  # noqa: E402
from peer.sim.costs import Workload  # noqa: E402
from peer.sim.run import simulate  # noqa: E402
from peer.sim.systems import NO_REBALANCING, SWARM, SimConfig  # noqa: E402
from peer.sim.world import UNEVEN_LINKS, WAN, Link, PeerSpec  # noqa: E402
from peer.swarm.rebalancing import Policy  # noqa: E402

BASELINE_TOKENS_PER_S = 161.6  # README battle table: `swarm-peer baseline` on one emulated device (slowdown 8)
LAN = Link(10_000, 0.05)
DEVICES = ("d0", "d1", "d2", "d3")
HOSTS = (*DEVICES, "boot", "trainer")  # benchmarks/battle.py draws uneven links in this order
MEASURED = {  # README battle table, swarm column (tokens/s over the window)
    "lan": 367.1, "wan": 286.6, "uneven-links": 283.0,
    "uneven-compute (rebalancing)": 146.0, "uneven-compute (static)": 94.0,
}
WORKLOAD = Workload("llama-14m", PRESETS["llama-14m"], 8192, 128, microbatch=2, batch_per_peer=4,
                    partition="balanced", matchmaking_s=1.0)


def device_flops(slowdown: float) -> float:
    macs_per_token = sum(stage_costs(WORKLOAD.spec, WORKLOAD.vocab_size, WORKLOAD.seq_len, 1))
    return BASELINE_TOKENS_PER_S * 6 * macs_per_token * 8.0 / slowdown


def links(scenario: str) -> dict[str, Link]:
    if scenario == "uneven-links":
        rng = random.Random(0)
        return {h: rng.choice(UNEVEN_LINKS) for h in HOSTS}
    return dict.fromkeys(HOSTS, WAN if scenario == "wan" else LAN)


def window_rate(done_at: list[float], window: float, per_step: int) -> float:
    """Tokens/s over ``window`` seconds from the first optimizer step (``per_step`` microbatches)."""
    if len(done_at) < per_step:
        return 0.0
    start = done_at[per_step - 1]
    return sum(1 for t in done_at if start < t <= start + window) * WORKLOAD.tokens_per_microbatch / window


def predict(scenario: str) -> dict[str, float]:
    uneven = scenario == "uneven-compute"
    slowdowns = {"d0": 8.0, "d1": 8.0, "d2": 16.0, "d3": 32.0} if uneven else dict.fromkeys(DEVICES, 8.0)
    world = links(scenario)
    specs = [PeerSpec(h, h, world[h], 0.0) for h in DEVICES]
    flops = {h: device_flops(slowdowns[h]) for h in DEVICES}
    placement = (0, 0, 0, 1) if uneven else (0, 0, 1, 1)  # battle.py CROWDED / SWARM_PLACEMENT
    cfg = SimConfig(stages=2, in_flight=8, inflight_per_peer=2.0, initial=placement, rebalance_period=20.0,
                    policy=Policy(cooldown_s=60.0), update_period=2.0, sample_s=5.0)
    window, duration = (60.0, 240.0) if uneven else (30.0, 180.0)
    systems = (SWARM, NO_REBALANCING) if uneven else (SWARM,)
    result = simulate(specs, cfg, duration, WORKLOAD, codec="none", systems=systems, flops=flops)
    per_step = WORKLOAD.batch_per_peer * len(specs) // WORKLOAD.microbatch
    if not uneven:
        return {scenario: window_rate(result["systems"][SWARM]["done_at"], window, per_step)}
    return {"uneven-compute (rebalancing)": window_rate(result["systems"][SWARM]["done_at"], window, per_step),
            "uneven-compute (static)": window_rate(result["systems"][NO_REBALANCING]["done_at"], window, per_step)}


def main() -> None:
    started = time.perf_counter()
    predicted: dict[str, float] = {}
    for scenario in ("lan", "wan", "uneven-links", "uneven-compute"):
        predicted.update(predict(scenario))
    rows = []
    print(f"{'scenario':<30} {'predicted':>10} {'measured':>10} {'ratio':>7}")
    for name, measured in MEASURED.items():
        ratio = predicted[name] / measured
        rows.append({"scenario": name, "predicted": round(predicted[name], 1), "measured": measured,
                     "ratio": round(ratio, 3), "within_20pct": abs(ratio - 1) <= 0.2})
        print(f"{name:<30} {predicted[name]:>10.1f} {measured:>10.1f} {ratio:>7.2f}")
    print(json.dumps({"benchmark": "simulate_calibration", "rows": rows,
                      "within_20pct": sum(r["within_20pct"] for r in rows), "of": len(rows),
                      "wall_s": round(time.perf_counter() - started, 2)}))


if __name__ == "__main__":
    main()
