"""`swarm-peer pipeline`: GPipe and 1F1B over torch.distributed.pipelining match the baseline step for step,
resume from per-stage checkpoints, and a dead worker stops the whole pipeline with a clear message."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, tiny_config, train_steps
from peer.baseline import train_baseline
from waiting import wait_until

pytestmark = pytest.mark.slow
COMMON = ["--preset", "tiny", "--batch-size", "8", "--microbatch-size", "2", "--lr", "3e-3", "--min-lr", "3e-4",
          "--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "0", "--eval-batches", "4",
          "--no-progress", "--json"]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def pipeline(*args, timeout=240):
    return subprocess.run([str(BIN / "swarm-peer"), "pipeline", *COMMON, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def baseline_losses(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("baseline")
    train_baseline(tiny_config(run_dir, max_steps=12, batch_size=8, microbatch_size=2, decay_steps=12,
                               eval_batches=4))
    return losses(run_dir)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_the_baseline_step_for_step(tmp_path, baseline_losses, schedule):
    proc = pipeline("--stages", "2", "--schedule", schedule, "--microbatches", "4", "--max-steps", "12",
                    "--decay-steps", "12", "--run-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["schedule"] == schedule and summary["stages"] == 2
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(baseline_losses[step], rel=2e-4, abs=2e-4), (step, got, baseline_losses)
    assert summary["val_loss"] is not None and summary["final_loss"] < summary["first_loss"]
    for stage in (0, 1):
        assert (tmp_path / "checkpoints" / f"stage-{stage}" / "step-00000012.pt").exists()


def test_resume_continues_from_the_stage_checkpoints(tmp_path, baseline_losses):
    first = pipeline("--stages", "2", "--max-steps", "5", "--decay-steps", "12", "--run-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    refused = pipeline("--stages", "2", "--max-steps", "12", "--decay-steps", "12", "--run-dir", str(tmp_path))
    assert refused.returncode != 0 and "--resume" in refused.stderr
    second = pipeline("--stages", "2", "--max-steps", "8", "--decay-steps", "12", "--run-dir", str(tmp_path),
                      "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1])["start_step"] == 5
    got = losses(tmp_path)
    for step in range(1, 9):
        assert got[step] == pytest.approx(baseline_losses[step], rel=2e-4, abs=2e-4), step


def test_compute_slowdown_reports_every_stages_busy_seconds(tmp_path, corpus):
    proc = pipeline("--stages", "2", "--max-steps", "3", "--compute-slowdown", "2", "--threads", "2",
                    "--run-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 torch thread(s) each" in proc.stderr  # --threads, not the cores split between the workers (1 here)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["compute_slowdown"] == 2.0 and summary["steps"] == 3
    busy = summary["stage_busy_s"]
    assert len(busy) == 2 and all(b > 0 for b in busy), busy  # one per stage, in rank order
    assert all(b <= summary["train_time_s"] for b in busy), summary  # busy within the training time


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_long_run(tmp_path):
    proc = subprocess.Popen([str(BIN / "swarm-peer"), "pipeline", *COMMON, "--stages", "2", "--max-steps", "100000",
                             "--run-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: train_steps(tmp_path / "metrics.jsonl") >= 1 or proc.poll() is not None, timeout=120,
               what="the pipeline's first logged step")
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    workers = children(proc.pid)
    assert len(workers) == 2, workers  # both stages are training: the first step needed both
    return proc, workers


def test_a_killed_worker_stops_the_pipeline_with_a_clear_message(tmp_path, corpus):
    proc, workers = start_long_run(tmp_path)
    try:
        victim = max(workers)  # started second: stage 1
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)  # not the 120 s --dist-timeout: the launcher noticed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "pipeline stopped: stage 1" in err and "killed by SIGKILL" in err, err[-3000:]
    wait_until(lambda: not [w for w in workers if alive(w)], timeout=10, what="no worker outliving the launcher")


def test_sigint_stops_all_stages_cleanly_with_checkpoints(tmp_path, corpus):
    proc, workers = start_long_run(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by"] in ("SIGTERM", "SIGINT") and summary["steps"] >= 1
    for stage in (0, 1):
        assert (tmp_path / "checkpoints" / f"stage-{stage}" / f"step-{summary['steps']:08d}.pt").exists()
    assert not [w for w in workers if alive(w)]
