"""Checked results on a live swarm: a fake stage-0 peer (``peer.attackers.LossForger``) announces a huge throughput
and answers every microbatch at once with a made-up loss. It gets a bounded share of the trainer's microbatches,
a check catches it, the trainer routes around it from then on and reports it (its metrics and ``inspect``), and
training finishes with nothing lost and no honest peer blamed (real `swarm-peer` processes; the forger is a real
gRPC server with a real stage record)."""

import re

import pytest

from peer.attackers import LossForger
from test_swarm import Swarm, finish
from waiting import wait_until

pytestmark = pytest.mark.slow
IN_FLIGHT = 4


def test_a_stage_that_makes_up_losses_is_caught_and_routed_around(tmp_path, spawn, run_id, corpus):
    swarm = Swarm(spawn, run_id)
    peers = [swarm.join(0), swarm.join(0), swarm.join(1)]
    swarm.wait_online(*peers)
    with LossForger(swarm.initial, run_id, stage=0, loss=1.0) as forger:
        wait_until(lambda: any(p["endpoint"] == forger.address for s in swarm.inspect()["stages"] for p in s["peers"]),
                   60, "the forger's stage record", period=1.0)
        trainer = swarm.train(tmp_path / "train", "--check-fraction", "0.3", "--in-flight", str(IN_FLIGHT),
                              "--eval-interval", "0")
        wait_until(lambda: "checked result: the route through" in trainer.stderr, 240,
                   lambda: f"a check that catches the forger:\n{trainer.stderr[-3000:]}", fail_if=trainer.exited)
        caught_at = forger.hops
        summary = finish(trainer, timeout=300)
        after = forger.hops - caught_at
    assert summary["lost_microbatches"] == 0 and summary["steps"] == 20, summary
    assert summary["distrusted"] == [forger.address], summary  # the forger, and no honest peer
    assert summary["checks"]["caught"] >= 1, summary["checks"]
    assert caught_at >= 1 and after <= IN_FLIGHT, (caught_at, after)  # only what was in flight when it was caught
    line = re.search(r"checked result: the route through (\S+) answered loss ([\d.]+)", trainer.stderr)
    assert line and line.group(1) == forger.address and float(line.group(2)) == 1.0, trainer.stderr[-3000:]
    # honest routes agreed when they were compared; those that differed (an update in between) blamed nobody
    assert summary["checks"]["agreed"] >= 1, summary["checks"]
    warnings = wait_until(lambda: [w for w in swarm.inspect()["warnings"] if "wrong result" in w], 60,
                          "the inspector's warning about the trainer's catch", period=1.0)
    assert forger.address in warnings[0], warnings
