"""The simulator (peer.sim): deterministic, conserving, close to its oracle when it should be, the baselines'
failure behaviour, the project's own policies, trace validation, and the command end to end."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peer.sim.dataplane
import peer.sim.systems
import peer.swarm.rebalancing
import peer.swarm.routing
from peer.errors import ConfigError
from peer.sim.costs import WORKLOADS, Costs
from peer.sim.run import peers_for, simulate
from peer.sim.systems import NO_REBALANCING, PIPELINE, SWARM, SimConfig, System
from peer.sim.world import SCENARIOS, Link, PeerSpec, load_trace

ROOT = Path(__file__).resolve().parents[1]
FAST = Link(1000, 5)  # compute-bound: what the homogeneous oracle check needs


def _run(specs, cfg, duration, systems=(SWARM, NO_REBALANCING, PIPELINE)):
    return simulate(specs, cfg, duration, systems=systems)


def _without_wall_times(result: dict) -> str:
    return json.dumps({name: {k: v for k, v in s.items() if k != "wall_s"} for name, s in result["systems"].items()},
                      sort_keys=True)


def test_a_seed_gives_the_same_run_twice_and_another_seed_another():
    specs = peers_for("churn", 24, 1800, seed=3)
    a = _run(specs, SimConfig(stages=4, seed=3), 1800)
    b = _run(peers_for("churn", 24, 1800, seed=3), SimConfig(stages=4, seed=3), 1800)
    assert _without_wall_times(a) == _without_wall_times(b)
    c = _run(peers_for("churn", 24, 1800, seed=4), SimConfig(stages=4, seed=4), 1800)
    assert c["systems"][SWARM]["tokens"] != a["systems"][SWARM]["tokens"]


def test_every_microbatch_that_starts_finishes_or_is_counted():
    world = dataclasses.replace(SCENARIOS["churn"], preemptions_per_hour=3.0, replace_after_s=120)  # heavy churn
    specs = peers_for("churn", 24, 3600, seed=1, world=world)
    result = _run(specs, SimConfig(stages=4, seed=1, max_attempts=3), 3600)
    for name, s in result["systems"].items():
        mb = s["microbatches"]
        assert mb["started"] == mb["completed"] + mb["lost"] + mb["in_flight_at_end"], (name, mb)
        assert mb["completed"] > 0, name
    swarm = result["systems"][SWARM]["microbatches"]
    assert swarm["retried"] > 0 and swarm["retried"] >= swarm["lost"]


def test_a_homogeneous_swarm_without_churn_reaches_its_oracle():
    specs = [PeerSpec(f"p{n}", "T4", FAST, 0.0) for n in range(16)]
    result = _run(specs, SimConfig(stages=4), 3600, systems=(SWARM,))
    assert result["systems"][SWARM]["fraction_of_oracle"] >= 0.95, result["systems"][SWARM]["fraction_of_oracle"]


def test_a_static_pipeline_stalls_until_the_replacement_has_loaded_while_swarm_keeps_going():
    # 8 T4s, 4 stages: two pipelines (peers 0-3 and 4-7), a swarm of two peers per stage. Peer 1 leaves at 600 s,
    # its replacement joins at 900 s and downloads a stage.
    specs = [PeerSpec(f"p{n}", "T4", FAST, 0.0, 600.0 if n == 1 else float("inf")) for n in range(8)]
    specs.append(PeerSpec("replacement", "T4", FAST, 900.0))
    cfg = SimConfig(stages=4, detect_s=10.0)
    costs = Costs(WORKLOADS["llama-1b"], 4, peers=8, codec="int8")
    flops = {"T4": costs.device_flops("T4")}
    pipeline = System(PIPELINE, specs, costs, cfg, flops).run(2400)
    loaded = 900.0 + costs.download_s(1, FAST)
    hit, spared = pipeline.trainers  # pipeline 0 lost its stage-1 peer; pipeline 1 did not
    stalled = [t for t in hit.done_at if 700 < t < loaded]
    assert not stalled, f"pipeline 0 completed microbatches at {stalled[:3]} before its replacement loaded"
    assert any(t > loaded for t in hit.done_at), "pipeline 0 never resumed"
    assert sum(1 for t in spared.done_at if 700 < t < loaded) > 0, "the other pipeline stalled too"

    swarm = System(SWARM, specs, costs, cfg, flops).run(2400)
    done = sorted(t for trainer in swarm.trainers for t in trainer.done_at)
    before = sum(1 for t in done if 200 < t < 600) / 400
    during = sum(1 for t in done if 700 < t < loaded) / (loaded - 700)
    assert during >= 0.5 * before, (before, during)  # one of eight peers gone: the swarm routes around it


def test_a_crowded_start_is_rebalanced_by_the_policy():
    # the battle test's uneven start: three peers in stage 0, one in stage 1
    specs = [PeerSpec(f"p{n}", "A10", FAST, 0.0) for n in range(4)]
    cfg = SimConfig(stages=2, initial=(0, 0, 0, 1), rebalance_period=60.0)
    result = _run(specs, cfg, 1800, systems=(SWARM, NO_REBALANCING))
    moved, static = result["systems"][SWARM], result["systems"][NO_REBALANCING]
    assert [(m["from"], m["to"]) for m in moved["moves"]] == [(0, 1)]
    assert moved["tokens"] > 1.3 * static["tokens"], (moved["tokens"], static["tokens"])


def test_the_simulator_calls_the_peers_policies_not_a_copy():
    assert peer.sim.systems.routing is peer.swarm.routing
    assert peer.sim.dataplane.routing is peer.swarm.routing
    assert peer.sim.systems.rebalancing is peer.swarm.rebalancing
    policy_names = {name for module in (peer.swarm.routing, peer.swarm.rebalancing)
                    for name, value in vars(module).items() if callable(value) and not name.startswith("__")}
    for path in (ROOT / "peer" / "sim").glob("*.py"):
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & policy_names, f"{path.name} defines {defined & policy_names}: a copy of a policy"
        for node in ast.walk(tree):  # the policies are used as module attributes, never imported by name
            if isinstance(node, ast.ImportFrom) and node.module in ("peer.swarm.routing", "peer.swarm.rebalancing"):
                pytest.fail(f"{path.name} imports names from {node.module}: use the module")


BAD_TRACES = [
    ("peer,device,join\n", "first line must be the header"),
    ("peer,device,join_s,leave_s\n", "no peers"),
    ("peer,device,join_s,leave_s\na,V100,0,\n", "line 2: unknown device 'V100'"),
    ("peer,device,join_s,leave_s\na,T4,soon,\n", "line 2: join_s 'soon' is not a number"),
    ("peer,device,join_s,leave_s\na,T4,-1,\n", "line 2: join_s '-1' must be a finite number"),
    ("peer,device,join_s,leave_s\na,T4,10,5\n", "line 2: leave_s 5 is not after join_s 10"),
    ("peer,device,join_s,leave_s\na,T4,0,100\na,T4,50,\n", "peer 'a' joins at 50 s before its stay"),
    ("peer,device,join_s,leave_s\na,T4,0\n", "line 2: 3 fields, the header has 4"),
    ("peer,device,join_s,leave_s,mbit_s,latency_ms\na,T4,0,,0,5\n", "line 2: mbit_s '0' must be"),
    ("peer,device,join_s,leave_s\na,T4,nan,\n", "line 2: join_s 'nan'"),
]


@pytest.mark.parametrize("text, error", BAD_TRACES)
def test_a_bad_trace_is_refused_with_a_clear_error(tmp_path, text, error):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        load_trace(path)


def test_a_trace_is_read_and_simulated(tmp_path):
    path = tmp_path / "trace.csv"
    rows = [f"p{n},{'A100' if n % 2 else 'T4'},0,{'' if n else 1200},1000,5" for n in range(6)]
    path.write_text("peer,device,join_s,leave_s,mbit_s,latency_ms\n" + "\n".join(rows) + "\np0,T4,1500,,1000,5\n")
    specs = load_trace(path)
    assert len(specs) == 7 and specs[0].leave_s == 1200 and specs[1].leave_s == float("inf")
    result = _run(specs, SimConfig(stages=2), 2400, systems=(SWARM,))
    assert result["systems"][SWARM]["microbatches"]["retried"] > 0  # p0 left with work in hand


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "peer.cli", "simulate", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def test_the_command_writes_its_json_and_plots(tmp_path):
    out = tmp_path / "run"
    proc = _cli("--peers", "16", "--stages", "2", "--duration", "900", "--scenario", "churn", "--seed", "2",
                "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["peers"] == 16 and summary["stages"] == 2 and 0 < summary["swarm_of_oracle"] <= 1.5
    result = json.loads((out / "result.json").read_text())
    assert set(result["systems"]) == {SWARM, NO_REBALANCING, PIPELINE} and result["scenario"] == "churn"
    for name in ("throughput.png", "utilisation.png", "peers.png", "moves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_the_command_says_what_is_wrong_in_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("peer,device,join_s,leave_s\nx,T4,0,-3\n")
    for args, error in ((["--scenario", "trace", "--trace", str(bad)], "line 2: leave_s"),
                        (["--scenario", "trace"], "needs --trace FILE"),
                        (["--peers", "2", "--stages", "4"], "every stage needs one")):
        proc = _cli(*args, "--out", str(tmp_path / "x"))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and error in lines[0] and "Traceback" not in proc.stderr, proc.stderr
