"""Emulated links (benchmarks/links.py): real network namespaces and TUN devices, a real userspace router;
what a probe measures through them is what the profile asks, within 10%."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from links import Profile, World, available, namespaces  # noqa: E402 - benchmarks/ is not a package
from waiting import wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]



@pytest.mark.parametrize("sender, receiver", [(Profile(100, 25), Profile(100, 25)),
                                              (Profile(50, 50), Profile(1000, 5))])
def test_measured_links_match_their_profiles(sender, receiver):
    before = namespaces()
    with World({"a": sender, "b": receiver}) as world:
        assert len(namespaces() - before) == 2
        asked = world.expected("a", "b")
        got = world.measure("a", "b", megabytes=16)
        wait_until(lambda: world.traffic()["b"]["received"] >= 16 * 2**20, timeout=5, what="the router's counts")
        traffic = world.traffic()
    # the router counts IP packets: the payload plus headers and the probe's round trips, a few % more
    assert 16 * 2**20 <= traffic["a"]["sent"] < 1.1 * 16 * 2**20, traffic
    assert traffic["b"]["sent"] < 2**20, traffic  # acks only
    assert got["rtt_ms"] == pytest.approx(asked["rtt_ms"], rel=0.1), (got, asked)
    assert got["mbit_s"] == pytest.approx(asked["mbit_s"], rel=0.1), (got, asked)
    assert namespaces() == before  # removed on the way out


def test_a_killed_harness_leaves_nothing_running_and_its_namespaces_go_at_the_next_start():
    from links import remove_leftovers
    from waiting import wait_until

    script = ("import sys; sys.path.insert(0, 'benchmarks'); from links import World, Profile\n"
              "w = World({'a': Profile(10, 5), 'b': Profile()}).__enter__()\n"
              "print(w.router.pid, *w.names.values(), flush=True); sys.stdin.read()\n")  # until killed
    root = Path(__file__).resolve().parents[1]
    harness = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        router, *names = harness.stdout.readline().split()
        assert set(names) <= namespaces()
        harness.kill()
        harness.wait(30)
        wait_until(lambda: not Path(f"/proc/{router}").exists(), 15, "the router's exit after the harness died")
        assert set(remove_leftovers()) >= set(names) and not set(names) & namespaces()
    finally:
        harness.kill()
        harness.wait(30)


def test_a_static_pipeline_runs_across_emulated_hosts(tmp_path, corpus):
    """`swarm-peer pipeline --nnodes 2`, one node per namespace: gloo must announce the address the other node can
    reach, not the one the hostname resolves to (127.0.1.1 here: the first stage's connections were refused)."""
    from conftest import BIN

    wan = Profile(100, 25)
    with World({"n0": wan, "n1": wan}) as world:
        common = [str(BIN / "swarm-peer"), "pipeline", "--preset", "tiny", "--stages", "2", "--nnodes", "2",
                  "--master-addr", world.address("n0"), "--master-port", "29533", "--batch-size", "8",
                  "--microbatch-size", "4", "--max-steps", "3", "--eval-interval", "0", "--json", "--no-progress"]
        nodes = [world.run(f"n{i}", [*common, "--node-rank", str(i), "--run-dir", str(tmp_path / f"node{i}")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
        try:
            results = [node.communicate(timeout=180) for node in nodes]
        finally:
            for node in nodes:
                node.kill()
                node.wait(30)
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert '"steps": 3' in results[1][0], results[1]  # the last stage reports the run
    assert "gloo: interface swp0" in results[0][1]
