"""Rebalancing end to end, with real processes: `--stage auto` peers crowded into stage 0 while stage 1 is
served by one pinned peer on an emulated slow device; one of them moves to stage 1 while a trainer trains."""

from __future__ import annotations

import pytest
import torch

from peer.checkpoint import latest_checkpoint
from test_swarm import REPLICA_TOLERANCE, SP, Swarm, finish, leave, metrics, settled_epochs, wait_steps
from test_swarm_faults import LONG
from waiting import wait_until

pytestmark = pytest.mark.slow
PERIOD = 8.0  # --rebalance-period: short, so the test sees several checks
# --min-stage-peers 2: of the three auto peers in stage 0 exactly one may leave (a second move would also pay here,
# as benchmarks/rebalance.py shows, but the test compares the replicas of a layout that must then stay put)
AUTO = ["--stage", "auto", "--initial-stage", "0", "--rebalance-period", str(PERIOD), "--rebalance-cooldown", "5",
        "--min-stage-peers", "2"]


def moves_in(peer) -> int:
    return peer.stderr.count("rebalancing: moving")


def test_auto_peers_move_to_the_slow_stage_and_stay(tmp_path, spawn, run_id, corpus):
    swarm = Swarm(spawn, run_id, LONG)
    slow = swarm.spawn([SP, "join", *swarm.common, "--stage", "1", "--host", "127.0.0.1",
                        "--compute-slowdown", "3", "--checkpoint-dir", tmp_path / "pinned", "--json"])
    swarm.wait_online(slow)
    # the trainer starts as soon as the first auto peer is ONLINE; each auto peer first checks at least 3/4 of a
    # period after it is ONLINE, so the move comes while it trains
    trainer = swarm.train(tmp_path / "train", "--max-tokens", str(30 * 1024), "--in-flight", "4",
                          "--eval-interval", "0")
    autos = [swarm.spawn([SP, "join", *swarm.common, *AUTO, "--host", "127.0.0.1",
                          "--checkpoint-dir", tmp_path / f"auto{i}", "--json"]) for i in range(3)]
    swarm.wait_online(*autos)

    # within three periods one of the crowded stage's peers moves to the slow stage
    wait_until(lambda: any("rebalancing: stage 1 peer ONLINE" in p.stderr for p in autos), 3 * PERIOD + 60,
               lambda: "a move to stage 1:\n" + "\n".join(p.stderr[-1500:] for p in autos), fail_if=trainer.exited)
    moved = [p for p in autos if moves_in(p)]
    assert len(moved) == 1, [moves_in(p) for p in autos]
    settled = len(metrics(tmp_path / "train" / "metrics.jsonl"))
    wait_steps(tmp_path / "train" / "metrics.jsonl", settled + 4, trainer)  # on the new layout
    summary = finish(trainer, timeout=300)
    assert summary["lost_microbatches"] == 0 and summary["steps"] == 30, summary

    stayed = [p for p in autos if p not in moved]
    epochs = settled_epochs(swarm, {0: len(stayed), 1: 1 + len(moved)})
    done = leave(slow, *autos)
    for peer, left in zip([slow, *autos], done, strict=True):
        assert moves_in(peer) == len(left.get("moves", [])) <= 1, left  # nobody moved back (or twice)
    moves = [move for left in done[1:] for move in left["moves"]]
    for move in moves:
        assert (move["from"], move["to"]) == (0, 1) and move["drained"] and move["state_from"] == "peers", move
    assert any(move["served_before"] > 0 for move in moves), moves  # a peer left a stage it was serving
    by_stage = {0: [], 1: [tmp_path / "pinned"]}
    for i, peer in enumerate(autos):
        by_stage[1 if peer in moved else 0].append(tmp_path / f"auto{i}")
    for stage, dirs in by_stage.items():  # the replicas of each stage are equal at the end
        paths = [latest_checkpoint(d / f"stage-{stage}") for d in dirs]
        states = [torch.load(p, weights_only=False) for p in paths]
        assert [s["step"] for s in states] == [epochs[stage]] * len(states), paths
        for other in states[1:]:
            for name, tensor in states[0]["model"].items():
                torch.testing.assert_close(tensor, other["model"][name], **REPLICA_TOLERANCE, msg=name)

