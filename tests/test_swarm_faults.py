"""Faults in a running swarm, with real processes: a hung peer, a graceful leave (also one ordered
mid-join), a whole stage lost
and brought back from its checkpoint, a peer killed during an averaging round. Trainers never fail and
never lose a microbatch; the surviving replicas of a stage stay equal."""

import json
import signal
import socket
import sys
import threading

import pytest
import torch

from test_swarm import REPLICA_TOLERANCE, SHARED, Swarm, finish, leave, metrics, settled_epochs, wait_steps
from waiting import wait_until

pytestmark = pytest.mark.slow
LONG = [*SHARED[:-4], "--max-steps", "400", "--decay-steps", "400"]


class HungServer:
    """Accepts TCP connections and never answers: a peer that hangs."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self):
        self._stop = True
        for conn in self.conns:
            conn.close()
        self.sock.close()


def test_a_hung_peer_is_banned_after_the_deadline_and_traffic_moves(tmp_path, spawn, run_id, corpus):
    swarm = Swarm(spawn, run_id)
    peers = [swarm.join(0, "--attempt-timeout", "3"), swarm.join(1)]
    swarm.wait_online(*peers)
    hung = HungServer()
    try:  # a stage-1 record that advertises 100x the real peer's throughput, in front of a server that hangs
        fake = spawn([sys.executable, "-m", "dht.testing", "--initial-peers", swarm.initial, "--run-id", run_id,
                      "--stage", "1", "--endpoint", f"127.0.0.1:{hung.port}", "--throughput", "10000",
                      "--update-period", "1"])
        fake.wait_for_stdout(lambda out: out.strip(), timeout=60)
        wait_until(lambda: "stage 1: 2 peer(s); new" in peers[0].stderr, 60,
                   "the stage-0 peer's directory sees the fake stage-1 peer")
        summary = finish(swarm.train(tmp_path / "train", "--max-tokens", str(6 * 1024), "--eval-interval", "0"))
    finally:
        hung.close()
    assert summary["steps"] == 6 and summary["lost_microbatches"] == 0 and summary["failures"] == 0
    assert summary["retries"] >= 1, summary
    assert "failed; banned for 2 s" in peers[0].stderr
    # a ban lasts 2 s, then 4 s, ...: the hung peer costs one deadline now and then, not one per microbatch
    assert summary["retries"] <= 6, summary
    # the inspector shows the finished trainer's counters, as its summary has them
    (seen,) = [t for t in swarm.inspect()["trainers"] if t["trainer_id"] == summary["trainer_id"]]
    assert seen["state"] == "DONE" and seen["steps"] == 6 and seen["lost"] == 0, seen
    assert (seen["retries"], seen["failures"], seen["bans"]) == (summary["retries"], summary["failures"],
                                                                 summary["bans"]), (seen, summary)


def test_a_graceful_leave_fails_no_microbatch(tmp_path, spawn, run_id, corpus):
    swarm = Swarm(spawn, run_id, LONG)
    stage0, stay, leaver = swarm.join(0), swarm.join(1), swarm.join(1)
    swarm.wait_online(stage0, stay, leaver)
    trainer = swarm.train(tmp_path / "train", "--max-tokens", str(30 * 1024), "--in-flight", "4",
                          "--eval-interval", "0")
    wait_steps(tmp_path / "train" / "metrics.jsonl", 5, trainer)
    assert leaver.stop(signal.SIGTERM, timeout=30) == 0, leaver.stderr[-3000:]  # fails the test after 30 s
    left = json.loads(leaver.stdout.strip().splitlines()[-1])
    assert left["drained"] and left["stopped_by"] == "SIGTERM"
    summary = finish(trainer, timeout=300)
    assert summary["steps"] == 30 and summary["failures"] == 0 and summary["lost_microbatches"] == 0, summary
    assert "OFFLINE" in leaver.stderr


def test_a_peer_told_to_leave_while_joining_never_serves(spawn, run_id, corpus):
    swarm = Swarm(spawn, run_id, LONG)
    joiner = swarm.join(0)
    wait_until(lambda: "joining run" in joiner.stderr, 120, "the peer is past start-up (SIGTERM lands mid-join)",
               period=0.05, fail_if=joiner.exited)
    assert joiner.stop(signal.SIGTERM, timeout=60) == 0, joiner.stderr[-3000:]
    left = json.loads(joiner.stdout.strip().splitlines()[-1])
    assert left["served"] == 0 and left["stopped_by"] == "SIGTERM", left
    assert "leaving before serving" in joiner.stderr and "peer ONLINE" not in joiner.stderr
    assert "OFFLINE" in joiner.stderr


def test_a_whole_stage_lost_then_restored_from_its_checkpoint(tmp_path, spawn, run_id, corpus):
    swarm = Swarm(spawn, run_id, LONG)
    ckpt = tmp_path / "ckpt"
    stage0 = swarm.join(0)
    doomed = swarm.join(1, "--checkpoint-dir", ckpt, "--checkpoint-interval", "2")
    swarm.wait_online(stage0, doomed)
    trainer = swarm.train(tmp_path / "train", "--max-tokens", str(40 * 1024), "--in-flight", "4",
                          "--eval-interval", "0", "--attempt-timeout", "5")
    before = wait_steps(tmp_path / "train" / "metrics.jsonl", 12, trainer)
    wait_until(lambda: list((ckpt / "stage-1").glob("step-*.pt")), timeout=120, what="the stage's first checkpoint")
    doomed.kill()  # SIGKILL: no goodbye, its record expires after 3 update periods
    # the trainer waits, and says so every 5 s, while the stage is empty
    waiting = "waiting for stage 1: no live peers"
    wait_until(lambda: trainer.stderr.count(waiting) >= 2 or trainer.proc.poll() is not None, timeout=90,
               what=lambda: f"the trainer saying '{waiting}' twice\n{trainer.stderr[-3000:]}")
    assert trainer.proc.poll() is None, trainer.stderr[-3000:]
    back = swarm.join(1, "--checkpoint-dir", ckpt)
    swarm.wait_online(back)
    online = next(line for line in back.stderr.splitlines() if "peer ONLINE" in line)
    assert "state from checkpoint step-" in online, online
    summary = finish(trainer, timeout=300)
    assert summary["steps"] == 40 and summary["lost_microbatches"] == 0, summary
    assert summary["waits"] > 0 and summary["recoveries"] >= 1 and summary["max_recovery_s"] > 5
    losses = {r["step"]: r["loss"] for r in metrics(tmp_path / "train" / "metrics.jsonl")}
    # training continued from the checkpoint: no return to the untrained loss
    assert losses[40] < before[0]["loss"] - 0.5, (before[0]["loss"], losses[40])


def test_a_peer_killed_during_averaging_leaves_its_stage_mates_equal(tmp_path, spawn, run_id, corpus):
    swarm = Swarm(spawn, run_id, LONG)
    stage0 = swarm.join(0)
    survivors = [swarm.join(1, "--checkpoint-dir", tmp_path / f"ckpt-{i}") for i in (0, 1)]
    # hivemind's own log shows when the victim enters an averaging round
    victim = swarm.join(1, env={"SWARM_HIVEMIND_VERBOSE": "1"})
    swarm.wait_online(stage0, *survivors, victim)
    trainer = swarm.train(tmp_path / "train", "--max-tokens", str(30 * 1024), "--in-flight", "4",
                          "--eval-interval", "0", "--attempt-timeout", "5")
    wait_steps(tmp_path / "train" / "metrics.jsonl", 4, trainer)
    rounds = victim.stderr.count("Beginning optimizer step")
    wait_until(lambda: victim.stderr.count("Beginning optimizer step") > rounds, 120,
               "the victim's next averaging round", period=0.02, fail_if=trainer.exited)  # kill it there
    victim.kill()
    killed_at = len(metrics(tmp_path / "train" / "metrics.jsonl"))
    summary = finish(trainer, timeout=300)
    assert summary["steps"] == 30 and summary["lost_microbatches"] == 0 and summary["failures"] == 0, summary
    assert killed_at < 30, "the kill came after the training: nothing was tested"
    epoch = settled_epochs(swarm, {1: 2})[1]  # the last round settles
    a, b = leave(*survivors)
    assert a["epoch"] == b["epoch"] == epoch and epoch > 4, (a, b)  # they kept stepping after the kill
    state_a = torch.load(next((tmp_path / "ckpt-0" / "stage-1").glob("step-*.pt")), weights_only=False)["model"]
    state_b = torch.load(next((tmp_path / "ckpt-1" / "stage-1").glob("step-*.pt")), weights_only=False)["model"]
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], **REPLICA_TOLERANCE, msg=name)
    leave(stage0)
