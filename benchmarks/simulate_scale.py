"""The simulator at scale: SWARM, SWARM without rebalancing and static pipelines as fractions of the oracle (the best
static assignment of the peers present), for N = 16, 128, 1,024 and 8,192 peers; and the square-cube check.

World: heterogeneous devices (50% T4, 30% A10, 15% A100, 5% H100), 10% of peers preempted per hour (exponential
lifetimes; each replaced by a peer of the same kind after ~5 min, which downloads its stage), 4 stages of a
1.2B-parameter Llama (32 x 2,048-token microbatches, int8 activations), one simulated hour per run. Two link
settings: `internet` (each peer's link drawn from 1 Gbit/5 ms, 200 Mbit/20 ms, 50 Mbit/50 ms, the battle test's
uneven links) and `fast` (every peer on 1 Gbit/5 ms, so devices, not links, bound the peers; 8,192 is left out
there: about 25M events per system, half an hour here). Wall time per run is the simulator's own (2 cores).

Square-cube: a stage of 6 layers of width H (MLP 4H) on an A100 against its microbatch's activations over
100 Mbit/s, for H = 1,024 .. 8,192: compute grows with H^2, the bytes with H; and a 32-peer A100 swarm on 100 Mbit/s
links per width, its compute utilisation.

    PYTHONPATH=. .venv/bin/python benchmarks/simulate_scale.py [--sizes 16 128 1024 8192] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peer.shapes import ModelSpec  # noqa: E402
from peer.sim.costs import WORKLOADS, Costs  # noqa: E402
from peer.sim.run import peers_for, simulate  # noqa: E402
from peer.sim.systems import NO_REBALANCING, PIPELINE, SWARM, SimConfig  # noqa: E402
from peer.sim.world import DEVICES, SCENARIOS, WAN, Link, PeerSpec  # noqa: E402

SYSTEMS = (SWARM, NO_REBALANCING, PIPELINE)
INTERNET = dataclasses.replace(SCENARIOS["heterogeneous"], preemptions_per_hour=0.1, replace_after_s=300.0)
FAST = dataclasses.replace(INTERNET, links=((Link(1000, 5), 1.0),))
WIDTHS = (1024, 2048, 4096, 8192)


def scale_row(world_name: str, n: int, seed: int, duration: float) -> dict:
    world = INTERNET if world_name == "internet" else FAST
    specs = peers_for("churn", n, duration, seed, world=world)
    started = time.perf_counter()
    result = simulate(specs, SimConfig(stages=4, seed=seed, sample_s=duration / 60), duration, systems=SYSTEMS)
    row = {"world": world_name, "peers": n, "stays": len(specs), "oracle_tokens_per_s": round(
        result["oracle"]["tokens_per_s"]), "wall_s": round(time.perf_counter() - started, 1)}
    for name in SYSTEMS:
        s = result["systems"][name]
        row[name] = {"of_oracle": round(s["fraction_of_oracle"], 3), "tokens_per_s": round(s["tokens_per_s"]),
                     "wall_s": s["wall_s"], "events": s["events"], "moves": len(s["moves"]),
                     "retried": s["microbatches"]["retried"], "lost": s["microbatches"]["lost"]}
    print(f"{world_name:<9} N={n:<5} swarm {row[SWARM]['of_oracle']:.3f}  no-rebalancing "
          f"{row[NO_REBALANCING]['of_oracle']:.3f}  pipeline {row[PIPELINE]['of_oracle']:.3f}  "
          f"(moves {row[SWARM]['moves']}, wall {row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return row


def square_cube(seed: int) -> list[dict]:
    rows = []
    base = WORKLOADS["llama-1b"]
    for h in WIDTHS:
        spec = ModelSpec("llama", hidden=h, intermediate=4 * h, heads=h // 128, layers=24, max_positions=2048)
        workload = dataclasses.replace(base, name=f"llama-h{h}", spec=spec)
        row = {"hidden": h}
        for codec in ("none", "int8"):
            costs = Costs(workload, 4, peers=32, codec=codec)
            compute = costs.compute_s(costs.device_flops("A100"), 1)
            transfer = costs.bytes_in[2] / WAN.bytes_per_s
            row[codec] = {"compute_s": round(compute, 3), "activations_s": round(transfer, 3),
                          "comm_over_compute": round(transfer / compute, 3)}
        specs = [PeerSpec(f"p{n}", "A100", WAN, 0.0) for n in range(32)]
        result = simulate(specs, SimConfig(stages=4, seed=seed, sample_s=60), 1800, workload, codec="int8",
                          systems=(SWARM,))
        timeline = result["systems"][SWARM]["timeline"]
        row["swarm_utilisation"] = round(sum(sum(r["utilisation"]) / 4 for r in timeline) / len(timeline), 3)
        row["swarm_of_oracle"] = round(result["systems"][SWARM]["fraction_of_oracle"], 3)
        print(f"square-cube H={h}: compute {row['int8']['compute_s']} s, activations {row['int8']['activations_s']} s"
              f" (int8), swarm busy {row['swarm_utilisation']}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], cube: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for world, style in (("internet", "-"), ("fast", ":")):
        for name, color in zip(SYSTEMS, ("C0", "C1", "C2"), strict=True):
            got = [(r["peers"], r[name]["of_oracle"]) for r in rows if r["world"] == world]
            if got:
                ax.plot(*zip(*got, strict=True), style, marker="o", color=color, label=f"{name} ({world} links)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("peers")
    ax.set_ylabel("fraction of the oracle")
    ax.set_title("heterogeneous devices, 10%/h preempted, 1 simulated hour", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for codec, style in (("none", "-"), ("int8", "--")):
        bx.plot([r["hidden"] for r in cube], [r[codec]["comm_over_compute"] for r in cube], style, marker="o",
                label=f"activations / compute ({codec})")
    bx.plot([r["hidden"] for r in cube], [r["swarm_utilisation"] for r in cube], "k-", marker="s",
            label="swarm compute busy (int8)")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("hidden size")
    bx.set_title("square-cube: A100 stage vs 100 Mbit/s link", fontsize=10)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 128, 1024, 8192])
    p.add_argument("--fast-max", type=int, default=1024, help="largest N in the fast-links world")
    p.add_argument("--worlds", nargs="+", default=["internet", "fast"], choices=["internet", "fast"])
    p.add_argument("--duration", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=Path("docs/simulate-scale.png"))
    args = p.parse_args()
    started = time.perf_counter()
    rows = [scale_row(world, n, args.seed, args.duration) for world in args.worlds for n in args.sizes
            if world == "internet" or n <= args.fast_max]
    cube = square_cube(args.seed)
    plot(rows, cube, args.plot)
    print(json.dumps({"benchmark": "simulate_scale", "devices": {d: DEVICES[d].peak_flops for d in DEVICES},
                      "rows": rows, "square_cube": cube, "plot": str(args.plot),
                      "wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
