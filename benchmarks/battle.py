"""Battle test: SWARM against a static pipeline and a single process, in emulated worlds of slow and uneven links,
mixed devices and vanishing machines, on one machine.

Each scenario builds a world (``links.World``: a network namespace per emulated machine, a userspace router that
gives each one a bandwidth and a one-way latency), measures every link before it trusts it (a ring of
measurements covers each machine's uplink and downlink; more than 10% off: the scenario does not report), then
runs the systems one after another on the same four emulated devices ``d0``..``d3``:

* ``pipeline``: a 4-stage 1F1B ``swarm-peer pipeline``, one stage per device;
* ``swarm``: 2 stages x 2 peers (``swarm-peer join``), a bootstrap on ``boot``, a trainer on ``trainer``;
* ``baseline``: ``swarm-peer baseline`` on one device (it sends nothing, so links do not change it).

Devices are slowed down (``--compute-slowdown``, ``--slowdown`` times and the scenario's factor) so that the four
of them need well under this machine's cores: the figures describe the emulated world, not core contention (each
scenario reports the machine's CPU utilisation while it measured). Each system is measured for ``--window``
seconds from its first logged step: tokens/s, loss against tokens, bytes on the wire per token (every packet the
router forwarded, DHT and averaging included).

Scenarios: lan, wan, uneven-links, uneven-compute, churn, square-cube, compression (``--scenario all``: every one
in that order; ``--quick``: wan with short windows). Output: one JSON line per scenario, the last line a JSON
object of them all, and ``<out>/report.md`` with PNG plots; each system's run directory keeps its metrics.jsonl and
its W&B offline run. Needs root (namespaces, TUN devices).

    sudo python benchmarks/battle.py [--scenario wan|all] [--quick] [--out runs/battle] [--window 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import signal
import sys
import time
from pathlib import Path

from battle_report import write_report
from battle_systems import DEVICES, Faults, Setup, run_baseline, run_pipeline, run_swarm
from links import Profile, World, available

LAN = Profile()
WAN = Profile(100, 25)
UNEVEN = (Profile(1000, 5), Profile(200, 20), Profile(50, 50))
HOSTS = (*DEVICES, "boot", "trainer")
TOLERANCE = 0.10
SWARM_PLACEMENT = {"d0": "0", "d1": "0", "d2": "1", "d3": "1"}
SCENARIOS = ("lan", "wan", "uneven-links", "uneven-compute", "churn", "square-cube", "compression")
UNEVEN_COMPUTE = {"d0": 1.0, "d1": 1.0, "d2": 2.0, "d3": 4.0}
# uneven-compute: the swarm starts crowded, three peers in stage 0 and the slowest device alone in stage 1 (as when
# peers joined while stage 1 was the stronger one, and its fast peers left). With 2 + 2 (both fast devices in stage
# 0) no single move helps: only a swap would, and the policy moves one peer at a time (see the README)
CROWDED = {"d0": "0", "d1": "0", "d2": "0", "d3": "1"}
WIDTHS = (128, 256, 512, 1024)
SQUARE_CUBE_SEQ = 32  # short sequences keep a step of the widest model short; compute and activations both scale
# with the tokens, so their ratio (what the scenario measures) does not depend on it
# the swarm peers' --averaging-timeout by width where the default 15 s is too short for a stage's gradients at
# 100 Mbit/s (hidden 1,024: ~200 MB per step); a longer one than needed only makes a failed round stall longer
SQUARE_CUBE_AVERAGING_TIMEOUT_S = {512: 25.0, 1024: 60.0}
CODECS = ("none", "fp16", "int8")


@dataclasses.dataclass
class Scenario:
    name: str
    links: dict[str, Profile]
    what: str
    slowdowns: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(DEVICES, 1.0))


def scenario_links(name: str, seed: int) -> dict[str, Profile]:
    if name in ("lan", "uneven-compute"):
        return dict.fromkeys(HOSTS, LAN)
    if name == "uneven-links":
        rng = random.Random(seed)
        return {h: rng.choice(UNEVEN) for h in HOSTS}
    return dict.fromkeys(HOSTS, WAN)


def check_links(world: World) -> tuple[bool, list[dict]]:
    """Measure a ring through every machine (each uplink and downlink once) against what the profiles ask; a link
    that reads off is measured once more with twice the bytes before it counts as off."""
    rows, ok = [], True
    for a, b in zip(HOSTS, HOSTS[1:] + HOSTS[:1], strict=True):
        asked = world.expected(a, b)
        # bulk bytes: 8 round trips' worth at the asked rate (flows past slow start), 4 MB to 32 MB
        rate = (asked["mbit_s"] or 400) / 8
        megabytes = min(32.0, max(4.0, rate * max(0.4, 8 * asked["rtt_ms"] / 1000)))
        for attempt in (1, 2):
            got = world.measure(a, b, megabytes=megabytes * attempt)
            rtt_ok = abs(got["rtt_ms"] - asked["rtt_ms"]) <= max(TOLERANCE * asked["rtt_ms"], 1.0)
            bw_ok = asked["mbit_s"] is None or abs(got["mbit_s"] - asked["mbit_s"]) <= TOLERANCE * asked["mbit_s"]
            if rtt_ok and bw_ok:
                break
        rows.append({"from": a, "to": b, "asked": asked, "measured": got, "ok": rtt_ok and bw_ok})
        ok &= rtt_ok and bw_ok
        off = "" if rtt_ok and bw_ok else "  OFF"
        print(f"  link {a} -> {b}: rtt {got['rtt_ms']:.1f} ms (asked {asked['rtt_ms']:g}), "
              f"{got['mbit_s']:.0f} Mbit/s (asked {asked['mbit_s'] or 'unlimited'}){off}", file=sys.stderr, flush=True)
    return ok, rows


def run_scenario(name: str, args, baselines: dict, reused: dict) -> dict:
    links = scenario_links(name, args.seed)
    slow = {h: args.slowdown * (UNEVEN_COMPUTE[h] if name == "uneven-compute" else 1.0) for h in DEVICES}
    out = args.out / name
    setup = Setup(args.preset, args.batch_size, args.microbatch_size, slow, args.window, out, seed=args.seed,
                  baseline_windows=1.0 if args.quick else 2.0)
    result = {"scenario": name, "links": {h: p.describe() for h, p in links.items()}, "slowdowns": slow,
              "preset": args.preset, "batch_size": args.batch_size, "microbatch_size": args.microbatch_size,
              "window_s": args.window, "systems": {}}
    started = time.time()
    print(f"scenario {name}", file=sys.stderr, flush=True)
    with World(links) as world:
        result["links_ok"], result["link_checks"] = check_links(world)
        if not result["links_ok"]:
            result["error"] = "links more than 10% off what was asked: no figures reported"
            return result
        systems = result["systems"]
        if name == "square-cube":
            for width in WIDTHS:
                sized = dataclasses.replace(setup, preset=f"llama-h{width}", seq_len=SQUARE_CUBE_SEQ,
                                            window=args.square_cube_window,
                                            averaging_timeout=SQUARE_CUBE_AVERAGING_TIMEOUT_S.get(width))
                systems[f"pipeline-h{width}"] = _run(run_pipeline, world, sized, name=f"pipeline-h{width}")
                systems[f"swarm-h{width}"] = _run(run_swarm, world, sized, SWARM_PLACEMENT, name=f"swarm-h{width}")
        elif name == "compression":
            if "wan" in reused:  # the same world and swarm as the wan scenario's, codec none
                systems["swarm-none"] = reused["wan"]
            for codec in CODECS if "wan" not in reused else CODECS[1:]:
                coded = dataclasses.replace(setup, codec=codec)
                systems[f"swarm-{codec}"] = _run(run_swarm, world, coded, SWARM_PLACEMENT, name=f"swarm-{codec}")
        else:
            faults = Faults(args.kill_every, args.restart_after, args.seed) if name == "churn" else None
            longer = _longer(name, setup, faults)
            systems["pipeline"] = _run(run_pipeline, world, longer, faults)
            if name == "uneven-compute":
                systems["swarm-rebalancing"] = _run(run_swarm, world, longer, CROWDED, name="swarm-rebalancing",
                                                    rebalance_period=args.rebalance_period)
                systems["swarm-static"] = _run(run_swarm, world, longer, CROWDED, name="swarm-static")
            else:
                systems["swarm"] = _run(run_swarm, world, longer, SWARM_PLACEMENT, faults)
                reused[name] = systems["swarm"]
    if name not in ("square-cube", "compression"):
        key = (args.preset, slow["d0"])
        if key not in baselines:
            baselines[key] = _run(run_baseline, setup)
        result["systems"]["baseline"] = baselines[key]
    result["wall_s"] = round(time.time() - started, 1)
    return result


def _longer(name: str, setup: Setup, faults: Faults | None) -> Setup:
    """The setup of a scenario that needs longer windows: uneven-compute (time for a move, and for the moved swarm
    to run) and churn (a kill and the machine's return, then 10 s of the swarm it makes)."""
    if name == "uneven-compute":
        return dataclasses.replace(setup, window=2 * setup.window)
    if faults:
        return dataclasses.replace(setup, window=max(setup.window, faults.every + faults.after + 10))
    return setup


def _run(fn, *args, **kwargs) -> dict:
    """One system's run; a failure is reported as such (the others still run)."""
    name = kwargs.get("name") or fn.__name__.removeprefix("run_")
    print(f"  {name} ...", file=sys.stderr, flush=True)
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the report says what failed and why
        return {"system": name, "error": f"{type(e).__name__}: {e}"[:3000], "tokens_per_s": None}
    print(f"  {name}: {result.get('tokens_per_s')} tokens/s, cpu {result.get('cpu_utilisation')}",
          file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="all", choices=[*SCENARIOS, "all"])
    p.add_argument("--quick", action="store_true", help="the wan scenario with 15 s windows and the tiny model "
                                                         "(about 3 minutes; what CI runs)")
    p.add_argument("--out", type=Path, default=None, help="where runs, report.md and plots go "
                                                          "(default: runs/battle-<time>)")
    p.add_argument("--window", type=float, default=30.0,
                   help="seconds each system is measured (uneven-compute and the baseline: 2x; churn: at "
                        "least --kill-every + --restart-after + 10)")
    p.add_argument("--square-cube-window", type=float, default=15.0,
                   help="square-cube: seconds each width is measured (its figure, the compute fraction, counts "
                        "the whole run)")
    p.add_argument("--preset", default="llama-14m")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (the pipeline's microbatches: "
                                                              "batch / microbatch size)")
    p.add_argument("--microbatch-size", type=int, default=2)
    p.add_argument("--slowdown", type=float, default=8.0,
                   help="--compute-slowdown of a 1x device: four devices then need ~4/8 of a core")
    p.add_argument("--kill-every", type=float, default=30.0, help="churn: seconds between kills")
    p.add_argument("--restart-after", type=float, default=10.0, help="churn: seconds until the machine is back")
    p.add_argument("--rebalance-period", type=float, default=20.0, help="uneven-compute: the peers' --rebalance-period")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # as Ctrl-C: every process stopped, every namespace removed
    why = available()
    if why:
        p.exit(2, f"battle.py: {why}; run it as root (e.g. sudo {sys.executable} {' '.join(sys.argv)})\n")
    if args.quick:
        args.scenario, args.window, args.preset, args.batch_size = "wan", min(args.window, 15.0), "tiny", 16
    args.out = (args.out or Path("runs") / f"battle-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results, baselines, reused, started = [], {}, {}, time.time()
    for name in names:
        result = run_scenario(name, args, baselines, reused)
        results.append(result)
        print(json.dumps(_brief(result)), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(results, args.out)
    print(json.dumps({"benchmark": "battle", "scenarios": [_brief(r) for r in results], "report": str(report),
                      "wall_s": round(time.time() - started, 1)}))
    return 0


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _brief(result: dict) -> dict:
    """A scenario's figures without its curves and timelines."""
    keep = ("tokens_per_s", "cpu_utilisation", "wire_bytes_per_token", "compute_fraction", "error", "trainer",
            "events", "steps_logged")
    systems = {k: {f: v[f] for f in keep if f in v} for k, v in result["systems"].items()}
    return {"scenario": result["scenario"], "links_ok": result.get("links_ok"), "error": result.get("error"),
            "systems": systems, "wall_s": result.get("wall_s")}


if __name__ == "__main__":
    sys.exit(main())
