"""One simulation: draw (or read) the peers, run each system on them, and the oracle; the figures as a dict."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Iterable

from peer.errors import ConfigError
from peer.sim import oracle
from peer.sim.costs import WORKLOADS, Costs, Workload
from peer.sim.systems import PIPELINE, SYSTEMS, SimConfig, System
from peer.sim.world import SCENARIOS, PeerSpec, WorldSpec, draw_peers, load_trace
from peer.swarm import rebalancing

logger = logging.getLogger(__name__)
SCENARIO_NAMES = (*SCENARIOS, "trace")


def peers_for(scenario: str, count: int, duration: float, seed: int, trace: Path | None = None,
              world: WorldSpec | None = None) -> list[PeerSpec]:
    """The peers' stays: drawn for a scenario (``world`` overrides its spec), or read from ``trace``."""
    if scenario == "trace":
        if trace is None:
            raise ConfigError("--scenario trace needs --trace FILE (a CSV of peer,device,join_s,leave_s)")
        return load_trace(Path(trace))
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; use one of {', '.join(SCENARIO_NAMES)}")
    return draw_peers(world or SCENARIOS[scenario], count, duration, random.Random(seed))


def simulate(specs: list[PeerSpec], cfg: SimConfig, duration: float, workload: Workload | str = "llama-1b",
             codec: str = "int8", systems: Iterable[str] = SYSTEMS, mfu: float = 0.35,
             flops: dict[str, float] | None = None) -> dict:
    """Run ``systems`` on the same peers for ``duration`` simulated seconds; their tokens/s against the oracle's.

    :param flops: FLOP/s of each device name the peers use (default: the datasheet classes at ``mfu``)
    :returns: ``{"systems": {name: figures}, "oracle": figures, ...}`` (see :func:`_figures`)
    """
    if duration <= 0:
        raise ConfigError(f"--duration {duration}: expected a positive number of simulated seconds")
    workload = WORKLOADS[workload] if isinstance(workload, str) else workload
    if cfg.stages > workload.spec.layers:
        raise ConfigError(f"--stages {cfg.stages}: {workload.name} has only {workload.spec.layers} layers")
    costs = Costs(workload, cfg.stages, sum(1 for s in specs if s.join_s <= 0), codec, mfu)
    flops = flops or {d: costs.device_flops(d) for d in {s.device for s in specs}}
    tokens_per_mb = workload.tokens_per_microbatch
    started = time.perf_counter()
    grid = oracle.timeline(specs, costs, flops, duration, cfg.sample_s)
    oracle_tokens = sum(row["microbatches_per_s"] * row["dt"] for row in grid) * tokens_per_mb
    result = {
        "workload": dataclasses.asdict(workload) | {"spec": dataclasses.asdict(workload.spec)},
        "codec": codec, "stages": cfg.stages, "duration_s": duration, "seed": cfg.seed,
        "peers": sum(1 for s in specs if s.join_s <= 0), "stays": len(specs),
        "devices": _count(s.device for s in specs if s.join_s <= 0),
        "stage_costs": costs.policy_costs, "stage_parameters": costs.parameters,
        "oracle": {"tokens_per_s": oracle_tokens / duration, "wall_s": time.perf_counter() - started,
                   "timeline": [{"t": r["t"], "tokens_per_s": r["microbatches_per_s"] * tokens_per_mb,
                                 "peers": r["peers"]} for r in grid]},
        "systems": {},
    }
    for kind in systems:
        started = time.perf_counter()
        system = System(kind, specs, costs, cfg, flops).run(duration)
        wall = time.perf_counter() - started
        result["systems"][kind] = _figures(system, duration, oracle_tokens, wall)
        result["systems"][kind]["done_at"] = sorted(t for trainer in system.trainers for t in trainer.done_at)
        logger.info("%s: %.0f tokens/s (%.3f of the oracle), %d events in %.1f s", kind,
                    result["systems"][kind]["tokens_per_s"], result["systems"][kind]["fraction_of_oracle"],
                    system.engine.events, wall)
    return result


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return dict(sorted(out.items()))


def _figures(system: System, duration: float, oracle_tokens: float, wall: float) -> dict:
    c = system.counters
    rows = system.timeline
    tokens_per_mb = system.costs.workload.tokens_per_microbatch
    timeline = []
    for a, b in zip(rows, rows[1:], strict=False):
        dt = b["t"] - a["t"]
        if dt <= 0:
            continue
        busy = [(y - x) / (dt * max(n, 1)) for x, y, n in zip(a["busy_s"], b["busy_s"], b["peers"], strict=True)]
        timeline.append({"t": a["t"], "tokens_per_s": (b["tokens"] - a["tokens"]) / dt, "peers": b["peers"],
                         "utilisation": [round(min(u, 1.0), 4) for u in busy], "moves": b["moves"]})
    return {
        "tokens_per_s": c["tokens"] / duration,
        "fraction_of_oracle": c["tokens"] / oracle_tokens if oracle_tokens > 0 else 0.0,
        "microbatches": {k: c[k] for k in ("started", "completed", "retried", "lost", "in_flight_at_end")},
        "recomputed_forwards": c["recomputed"], "rounds": c["rounds"], "averaging_s": round(c["averaging_s"], 3),
        "moves": system.moves, "events": system.engine.events, "wall_s": round(wall, 3),
        "tokens": c["tokens"], "tokens_per_microbatch": tokens_per_mb,
        "pipelines": len({g for g, _ in system.slots}) if system.kind == PIPELINE else None,
        "timeline": timeline,
    }


MAX_PEERS = 100_000
MAX_DURATION_S = 7 * 24 * 3600.0


def run_command(cfg, peers: int, duration: float, scenario: str, trace: Path | None, out: Path | None) -> dict:
    """``swarm-peer simulate``: the simulation of ``cfg`` (a :class:`peer.config.RunConfig`: stages, seed, codec,
    in-flight, update and rebalancing periods, attempt timeout), its files in ``out``; returns the summary."""
    from peer.sim import report

    if scenario != "trace" and not 1 <= peers <= MAX_PEERS:
        raise ConfigError(f"--peers {peers}: expected 1 to {MAX_PEERS}")
    if not 0 < duration <= MAX_DURATION_S:
        raise ConfigError(f"--duration {duration}: expected 0 < seconds <= {MAX_DURATION_S:.0f} (a week)")
    if trace is not None and scenario != "trace":
        raise ConfigError("--trace FILE goes with --scenario trace")
    stages = cfg.model.stages
    specs = peers_for(scenario, peers, duration, cfg.train.seed, trace)
    initial = sum(1 for s in specs if s.join_s <= 0)
    if max(initial, 1) < stages:
        raise ConfigError(f"{initial} peer(s) at the start for {stages} stages: every stage needs one "
                          "(--peers at least --stages, or a trace with that many peers at join_s 0)")
    p = cfg.peer
    sim = SimConfig(stages=stages, seed=cfg.train.seed, in_flight=cfg.trainer.in_flight,
                    update_period=cfg.net.update_period, detect_s=cfg.link.attempt_timeout,
                    policy=rebalancing.Policy(p.rebalance_threshold, p.min_stage_peers, p.rebalance_cooldown),
                    rebalance_period=p.rebalance_period, sample_s=max(1.0, duration / 60))
    started = time.perf_counter()
    result = simulate(specs, sim, duration, codec=cfg.link.codec) | {"scenario": scenario}
    wall = time.perf_counter() - started
    result["wall_s"] = wall
    out = out or Path("runs") / f"simulate-{scenario}-{peers if scenario != 'trace' else initial}-{cfg.train.seed}"
    files = report.write(result, Path(out))
    return report.summary(result, wall) | {"out": str(out), "files": len(files)}
