"""``swarm-peer pipeline``: start the workers of a static pipeline, watch them, stop them together.

The launcher starts this node's share of the ``--stages`` workers (all of them on one
machine; ``--nnodes/--node-rank/--master-addr/--master-port`` split them over several),
each a ``peer.pipeline.worker`` process with its torch threads limited so the cores are
not oversubscribed (or to ``--threads``). It waits for them; if one dies (a crash, SIGKILL, OOM) it stops the
others at once and reports which stage died and why — a static pipeline cannot route
around a dead stage, which is the point of comparison with SWARM. On SIGINT/SIGTERM it
asks the workers to stop after the current step (they save a checkpoint) and exits 0.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import struct
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
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


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
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // per_node)

    env = _gloo_env(p.master_addr) if p.nnodes > 1 else None
    workers: dict[int, subprocess.Popen] = {}
    try:
        for local in range(per_node):
            rank = p.node_rank * per_node + local
            workers[rank] = subprocess.Popen([
                sys.executable, "-m", "peer.pipeline.worker", "--rank", str(rank), "--world", str(stages),
                "--local-rank", str(local), "--master", f"{p.master_addr}:{port}", "--config", str(config_file),
                "--run-id", run_id, "--run-dir", str(run_dir), "--checkpoint-dir", str(ckpt_dir),
                "--threads", str(threads)], start_new_session=True, env=env)
        logger.info("pipeline %s: %d stage worker(s) on this node (ranks %s), %d torch thread(s) each",
                    run_id, per_node, ", ".join(map(str, workers)), threads)
        _wait(workers, stop, run_dir)
    finally:
        stop_all(workers.values(), KILL_GRACE_S, term_group=True)  # no worker outlives the launcher
    summary_file = run_dir / "pipeline" / "summary.json"
    return json.loads(summary_file.read_text()) if summary_file.exists() else None


def _gloo_env(master: str) -> dict[str, str] | None:
    """Over several nodes, gloo must announce an address the other nodes can reach; left alone it takes the one
    this machine's hostname resolves to, often 127.0.1.1 (and the other nodes' connections are refused). So unless
    ``GLOO_SOCKET_IFNAME`` is set, the workers get the interface that holds the address this machine reaches
    ``master`` from. None: keep the environment as it is."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return None
    name = interface_towards(master)
    if name is None:
        logger.warning("no network interface found towards %s; set GLOO_SOCKET_IFNAME if the stages cannot connect",
                       master)
        return None
    logger.info("gloo: interface %s (set GLOO_SOCKET_IFNAME to choose another)", name)
    return {**os.environ, "GLOO_SOCKET_IFNAME": name}


def interface_towards(host: str) -> str | None:
    """The name of the interface holding the IPv4 address this machine uses to reach ``host`` (None if none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # a UDP connect sends nothing: it only picks the route and the source address
            local = probe.getsockname()[0]
    except OSError:
        return None
    return next((name for _, name in socket.if_nameindex() if _ipv4_address(name) == local), None)


def _ipv4_address(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", interface[:15].encode()))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(packed[20:24])


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


