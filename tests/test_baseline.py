"""The single-process baseline trains the real model on the embedded corpus, resumes exactly, and
runs from the console script."""

import json
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, tiny_config, train_steps
from peer import checkpoint as ckpt
from peer.baseline import train_baseline
from peer.errors import CheckpointError
from peer.training import StopFlag
from waiting import wait_until


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_loss_falls_by_a_fifth_on_the_embedded_corpus(tmp_path, corpus):
    summary = train_baseline(tiny_config(tmp_path, max_steps=40, log_interval=5, eval_interval=20))
    assert summary["steps"] == 40
    assert summary["final_loss"] <= 0.8 * summary["first_loss"], summary
    assert summary["val_loss"] < summary["first_loss"]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("eval") == 2 and kinds[-1] == "summary"
    assert summary["checkpoint"].endswith("step-00000040.pt")


def test_resume_continues_exactly_where_it_stopped(tmp_path, corpus):
    # decay_steps pins the schedule, so a run cut at step 4 follows the same LR as the straight one
    straight = tmp_path / "straight"
    train_baseline(tiny_config(straight, max_steps=8, decay_steps=8))

    resumed = tmp_path / "resumed"
    first = train_baseline(tiny_config(resumed, max_steps=4, decay_steps=8))
    assert first["checkpoint"].endswith("step-00000004.pt")
    with pytest.raises(CheckpointError, match="pass --resume"):
        train_baseline(tiny_config(resumed, max_steps=8, decay_steps=8))
    second = train_baseline(tiny_config(resumed, max_steps=8, decay_steps=8, resume=True))
    assert second["start_step"] == 4 and second["steps"] == 8

    expected, got = train_losses(straight), train_losses(resumed)
    assert [got[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]


def test_resume_refuses_another_model(tmp_path, corpus):
    train_baseline(tiny_config(tmp_path, max_steps=1))
    with pytest.raises(CheckpointError, match="different run.*preset"):
        train_baseline(tiny_config(tmp_path, max_steps=2, resume=True, preset="llama-14m"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_baseline(tiny_config(tmp_path / "empty", max_steps=2, resume=True))


def test_compute_slowdown_makes_every_step_slower(tmp_path, corpus):
    # the same 3 steps (2 microbatches each) at 1 and at 3: forward+backward, most of a step, take 3x as long
    small = dict(max_steps=3, batch_size=8, microbatch_size=4)
    normal = train_baseline(tiny_config(tmp_path / "normal", **small))
    slowed = train_baseline(tiny_config(tmp_path / "slowed", compute_slowdown=3.0, **small))
    assert normal["compute_slowdown"] == 1.0 and slowed["compute_slowdown"] == 3.0
    assert slowed["median_step_time"] >= 1.8 * normal["median_step_time"], (slowed, normal)
    assert slowed["final_loss"] == normal["final_loss"]  # slower, not different


class StopAfter(StopFlag):
    """A stop flag that a signal sets once the trainer has asked ``checks`` times (once per step)."""

    def __init__(self, checks: int):
        super().__init__()
        self.left = checks

    def __bool__(self) -> bool:
        self.left -= 1
        if self.left < 0 and not self.signal_name:
            self.set("SIGTERM")
        return super().__bool__()


def test_stop_flag_saves_a_checkpoint_and_ends_cleanly(tmp_path, corpus):
    summary = train_baseline(tiny_config(tmp_path, max_steps=6, decay_steps=6), StopAfter(3))
    assert summary["steps"] == 3 and summary["stopped_by"] == "SIGTERM"
    [(step, path)] = ckpt.checkpoint_steps(Path(summary["checkpoint"]).parent)
    assert step == 3 and summary["checkpoint"] == str(path)  # saved at the stop (no periodic checkpoints here)
    resumed = train_baseline(tiny_config(tmp_path, max_steps=6, decay_steps=6, resume=True))
    assert resumed["start_step"] == 3 and resumed["steps"] == 6


def test_a_stop_before_the_first_step_saves_nothing(tmp_path, corpus):
    stop = StopFlag()
    stop.set("SIGTERM")
    summary = train_baseline(tiny_config(tmp_path, max_steps=5), stop)
    assert summary["steps"] == 0 and summary["stopped_by"] == "SIGTERM" and summary["checkpoint"] is None


def run_cli(*args, timeout=180, **kw):
    return subprocess.run([str(BIN / "swarm-peer"), *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_console_script_trains_and_prints_json_summary_with_wandb_offline(tmp_path, corpus):
    proc = run_cli("baseline", "--preset", "tiny", "--max-steps", "3", "--eval-interval", "0",
                   "--run-dir", str(tmp_path), "--wandb-project", "swarm-peer-tests", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["preset"] == "tiny"
    assert "step 3/3 | loss" in proc.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B offline run directory missing"


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_zero(tmp_path, corpus):
    proc = subprocess.Popen([str(BIN / "swarm-peer"), "baseline", "--preset", "tiny", "--max-steps", "100000",
                             "--run-dir", str(tmp_path), "--no-progress", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: train_steps(tmp_path / "metrics.jsonl") >= 1 or proc.poll() is not None, timeout=120,
                   what="the first logged training step")  # mid-run, not before the first step
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] >= 1
    assert (tmp_path / "checkpoints" / f"step-{summary['steps']:08d}.pt").exists()
    assert "resume with --resume" in err
