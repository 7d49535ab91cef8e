"""State takeover: a stranger (no stage record) publishes a far higher epoch for a stage and serves a finite but
wrong state at the highest priority (``peer.attackers.StateThief``). Replicas keep their epoch, a newcomer
downloads from a real replica, and training goes on (real processes; the thief is a real hivemind collaboration
member in this process)."""

import re

import pytest

from peer.attackers import FAR_EPOCH, StateThief
from test_swarm import SHARED, Swarm, metrics, wait_steps
from waiting import wait_until

pytestmark = pytest.mark.slow
LONG = [*SHARED[:-4], "--max-steps", "400", "--decay-steps", "400"]
THIEF_CONFIG = {"preset": "tiny", "stages": 2, "batch_size": 8, "microbatch_size": 2}


def stage_steps(swarm, stage: int) -> list[int]:
    """The epochs that the live peers of ``stage`` announce."""
    view = swarm.inspect()
    return [p["step"] for s in view["stages"] if s["stage"] == stage for p in s["peers"]]


def test_a_strangers_epoch_and_state_are_never_loaded(tmp_path, spawn, run_id, corpus):
    swarm = Swarm(spawn, run_id, LONG)
    peers = [swarm.join(0), swarm.join(0), swarm.join(1)]
    swarm.wait_online(*peers)
    path = tmp_path / "train" / "metrics.jsonl"
    trainer = swarm.train(tmp_path / "train", "--in-flight", "4", "--eval-interval", "0")
    wait_steps(path, 3, trainer)
    with StateThief(swarm.initial, run_id, 0, THIEF_CONFIG) as thief:
        wait_until(thief.declared, 30, "the thief's progress record and averager declaration", period=0.5)
        wait_steps(path, len(metrics(path)) + 4, trainer, timeout=240)  # training goes on, at the replicas' epoch
        newcomer = swarm.join(0)
        swarm.wait_online(newcomer)
        online = next(line for line in newcomer.stderr.splitlines() if "peer ONLINE" in line)
        assert "state from peers" in online, online
        assert int(online.rsplit("epoch ", 1)[1]) < FAR_EPOCH, online
        assert f"not downloading the stage's state from {thief.peer_id}" in newcomer.stderr, newcomer.stderr[-3000:]
        wait_steps(path, len(metrics(path)) + 3, trainer, timeout=240)
        steps = wait_until(lambda: three if len(three := stage_steps(swarm, 0)) == 3 else None, 30,
                           "the records of stage 0's three replicas")
        assert max(steps) < FAR_EPOCH, steps
    for peer in (*peers[:2], newcomer):
        assert not re.search(rf"collaboration at {FAR_EPOCH}|epoch {FAR_EPOCH}", peer.stderr), peer.stderr[-3000:]
    losses = [r["loss"] for r in metrics(path)]
    assert all(loss < 20 for loss in losses), losses  # finite, still learning: no replica took the thief's state
