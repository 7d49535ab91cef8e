"""``swarm-peer pipeline``: start the workers of a static pipeline, watch them, stop them together.

The launcher starts this node's share of the ``--stages`` workers (all of them on one
machine; ``--nnodes/--node-rank/--master-addr/--master-port`` split them over several),
each a ``peer.pipeline.worker`` process with its torch threads limited so the cores are
not oversubscribed. It waits for them; if one dies (a crash, SIGKILL, OOM) it stops the
others at once and reports which stage died and why — a static pipeline cannot route
around a dead stage, which is the point of comparison with SWARM. On SIGINT/SIGTERM it
asks the workers to stop after the current step (they save a checkpoint) and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from peer.config import RunConfig
from peer.errors import SwarmError
from peer.processes import send, stop_all
from peer.training import StopFlag, run_dir_for

logger = logging.getLogger("peer.pipeline")
KILL_GRACE_S = 5.0


class PipelineFailed(SwarmError):
    exit_code = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def launch(cfg: RunConfig, stop: StopFlag) -> dict | None:
    """Run the pipeline; :returns: the last stage's summary (None on a node without the last stage)."""
    p = cfg.pipeline
    stages = cfg.model.stages
    if stages < 1 or stages % p.nnodes:
        raise SwarmError(f"--stages {stages} must be a positive multiple of --nnodes {p.nnodes}")
    if not 0 <= p.node_rank < p.nnodes:
        raise SwarmError(f"--node-rank {p.node_rank} must be in 0..{p.nnodes - 1}")
    per_node = stages // p.nnodes
    run_id, run_dir, ckpt_dir = run_dir_for(cfg, "pipeline")
    port = p.master_port or (free_port() if p.nnodes == 1 else 29500)
    (run_dir / "pipeline").mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "pipeline" / f"config-node{p.node_rank}.json"
    config_file.write_text(cfg.model_dump_json())
    for stale in (run_dir / "pipeline").glob("stage-*.error"):
        stale.unlink()
    threads = max(1, (os.cpu_count() or 1) // per_node)

    workers: dict[int, subprocess.Popen] = {}
    try:
        for local in range(per_node):
            rank = p.node_rank * per_node + local
            workers[rank] = subprocess.Popen([
                sys.executable, "-m", "peer.pipeline.worker", "--rank", str(rank), "--world", str(stages),
                "--local-rank", str(local), "--master", f"{p.master_addr}:{port}", "--config", str(config_file),
                "--run-id", run_id, "--run-dir", str(run_dir), "--checkpoint-dir", str(ckpt_dir),
                "--threads", str(threads)], start_new_session=True)
        logger.info("pipeline %s: %d stage worker(s) on this node (ranks %s), %d torch thread(s) each",
                    run_id, per_node, ", ".join(map(str, workers)), threads)
        _wait(workers, stop, run_dir)
    finally:
        stop_all(workers.values(), KILL_GRACE_S, term_group=True)  # no worker outlives the launcher
    summary_file = run_dir / "pipeline" / "summary.json"
    return json.loads(summary_file.read_text()) if summary_file.exists() else None


def _wait(workers: dict[int, subprocess.Popen], stop: StopFlag, run_dir: Path) -> None:
    forwarded = False
    while True:
        if stop and not forwarded:  # ask every worker to stop after its step; they agree among themselves
            for proc in workers.values():
                send(proc, signal.SIGTERM, group=True)
            forwarded = True
        codes = {rank: proc.poll() for rank, proc in workers.items()}
        failed = {rank: code for rank, code in codes.items() if code not in (None, 0)}
        if failed:
            time.sleep(0.5)  # let the stages that lost their neighbour report too, then name them all
            failed.update({r: c for r, c in ((r, w.poll()) for r, w in workers.items()) if c not in (None, 0)})
            # a stage killed by a signal is the likely root cause; the others lost their neighbour
            order = sorted(failed, key=lambda r: (failed[r] >= 0, r))
            parts = []
            for rank in order:
                error = run_dir / "pipeline" / f"stage-{rank}.error"
                cause = error.read_text().splitlines()[0] if error.exists() else "no error report"
                parts.append(f"stage {rank} (pid {workers[rank].pid}) {_describe_exit(failed[rank])}: {cause}")
            raise PipelineFailed("pipeline stopped: " + "; ".join(parts) + "; the other stages were stopped")
        if all(code == 0 for code in codes.values()):
            return
        time.sleep(0.2)


