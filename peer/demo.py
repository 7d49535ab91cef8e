"""``swarm-peer demo``: a whole swarm on this machine - bootstrap, S stages x R peers, T trainers.

Every role is a separate ``swarm-peer`` process, started the way a user would start it,
with one torch thread each so a small machine is not oversubscribed, logging to
``<run dir>/logs/``. The demo waits until every stage peer is ONLINE, starts the
trainers, shows progress and a per-stage line while they train, then stops everything:
stage peers get SIGTERM (a graceful leave), stragglers SIGKILL; nothing is left running,
also after Ctrl-C. It ends with a summary of the trainers' results.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dht.records import PeerState
from peer.config import SHARED_FIELDS, RunConfig
from peer.errors import SwarmError
from peer.metrics import human, stage_batches
from peer.processes import send, stop_all
from peer.training import StopFlag

logger = logging.getLogger("peer.demo")
# A short run on a small machine: what the demo uses unless the user sets it (flag, variable or TOML).
READY_TIMEOUT_S = 300.0
LEAVE_TIMEOUT_S = 40.0


class Child:
    """A ``swarm-peer`` sub-process in its own session, logging to a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = open(self.log, "w")
        env = {**os.environ, "SWARM_EXIT_WITH_PARENT": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "peer.cli", *args], stdout=subprocess.PIPE,
                                     stderr=self._log_file, text=True, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Close our end of its log file (once it has exited; its stdout pipe is read by :meth:`last_json`)."""
        self._log_file.close()

    def signal(self, sig: int) -> None:
        """SIGTERM goes to the process itself (it shuts its helpers down in order); SIGKILL to its whole group."""
        send(self.proc, sig, group=sig == signal.SIGKILL)

    def last_json(self) -> dict | None:
        """The last JSON line the process printed on stdout (its summary)."""
        out = self.proc.stdout.read() if self.proc.stdout else ""
        for line in reversed(out.strip().splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
        return None


DATA_FLAGS = ("dataset", "tokenizer")


def _flags(cfg: RunConfig, names) -> list[str]:
    out = []
    for name in names:
        section = next(s for s in ("model", "data", "optim", "train") if name in getattr(cfg, s).model_fields)
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def run_demo(cfg: RunConfig, stop: StopFlag, debug: bool = False) -> dict:
    from dht.node import SwarmNode  # hivemind (and its uvloop policy) only once the demo runs

    d = cfg.demo
    run_id = cfg.log.run_id or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.log.run_dir or Path("runs") / run_id)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--run-id", run_id, "--update-period", str(cfg.net.update_period)]
    if debug:
        common.append("--debug")
    children: list[Child] = []
    observer = None
    try:
        data = [*_flags(cfg, DATA_FLAGS), "--cache-dir", str(cfg.data.cache_dir)]  # the run's tokenizer and the
        # trainers' data: not in the run's record, so each of them gets them here
        boot = Child("bootstrap", ["bootstrap", *common, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--json",
                                   *_flags(cfg, SHARED_FIELDS), *data], logs)
        children.append(boot)
        line = boot.proc.stdout.readline()
        if not line:
            raise SwarmError(f"the bootstrap node did not start; see {boot.log}")
        initial = json.loads(line)["initial_peers"][0]
        logger.info("demo %s: bootstrap at %s; starting %d stages x %d peers", run_id, initial, cfg.model.stages,
                    d.peers_per_stage)
        # Explicit ports: a fixed SWARM_PORT / SWARM_HOST_MADDRS in the environment (the Docker image sets both)
        # must not make the demo's processes fight over one port.
        net = [*common, "--initial-peers", initial, "--threads", "1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
        for stage in range(cfg.model.stages):
            for replica in range(d.peers_per_stage):
                name = f"stage{stage}-peer{replica}"
                children.append(Child(name, ["join", *net, "--stage", str(stage), "--host", "127.0.0.1", "--port", "0",
                                             "--public-name", name, "--throughput", cfg.peer.throughput,
                                             "--matchmaking-time", str(cfg.peer.matchmaking_time),
                                             "--cache-dir", str(cfg.data.cache_dir),
                                             "--checkpoint-dir", str(run_dir / "checkpoints"), "--json"], logs))
        observer = SwarmNode.start(run_id, [initial], client_mode=True)
        _wait_online(observer, cfg.model.stages, cfg.model.stages * d.peers_per_stage, children, stop)

        trainers = []
        for index in range(d.trainers):
            trainers.append(Child(f"trainer{index}", [
                "train", *net, "--trainer-index", str(index), "--num-trainers", str(d.trainers),
                "--in-flight", str(cfg.trainer.in_flight), "--run-dir", str(run_dir / f"trainer{index}"),
                "--eval-interval", str(cfg.train.eval_interval), "--eval-batches", str(cfg.train.eval_batches),
                "--log-interval", str(cfg.log.log_interval), *data, "--no-progress", "--json"], logs))
        children += trainers
        logger.info("demo %s: %d trainer(s) started; logs in %s", run_id, len(trainers), logs)
        _watch(observer, cfg, trainers, children, run_dir, stop)
        results = [t.last_json() for t in trainers if not t.alive()]
    finally:
        _stop_all(children)
        if observer is not None:
            observer.shutdown()
    peers = [c.last_json() for c in children if c.name.startswith("stage")]
    return _summary(run_id, run_dir, cfg, results, [p for p in peers if p], stop)


def _wait_online(observer, stages: int, expected: int, children: list[Child], stop: StopFlag) -> None:
    deadline = time.time() + READY_TIMEOUT_S
    while not stop:
        peers = live_peers_safe(observer, stages)
        online = sum(1 for k in peers for p in peers[k] if p.record.state == PeerState.ONLINE)
        dead = [c for c in children if not c.alive()]
        if dead:
            raise SwarmError(f"{dead[0].name} exited with code {dead[0].proc.returncode}; see {dead[0].log}")
        if online >= expected:
            logger.info("all %d stage peers are ONLINE", expected)
            return
        if time.time() > deadline:
            raise SwarmError(f"only {online} of {expected} stage peers came ONLINE in {READY_TIMEOUT_S:.0f} s")
        time.sleep(1.0)


def live_peers_safe(observer, stages: int) -> dict:
    from dht.peers import live_peers  # hivemind, as in run_demo

    try:
        return live_peers(observer, stages, timeout=10)
    except Exception:  # a slow DHT read: show nothing this time
        return {}


def _watch(observer, cfg: RunConfig, trainers: list[Child], children: list[Child], run_dir: Path,
           stop: StopFlag) -> None:
    """Until the trainers finish: a progress line per trainer and a compact per-stage line."""
    deadline = time.time() + cfg.demo.demo_timeout
    while any(t.alive() for t in trainers):
        if stop or time.time() > deadline:
            reason = stop.signal_name if stop else f"time limit ({cfg.demo.demo_timeout:.0f} s)"
            logger.warning("stopping the demo (%s)", reason)
            for t in trainers:
                t.signal(signal.SIGTERM)
            break
        _forget_one_exited(children, trainers)
        peers = live_peers_safe(observer, cfg.model.stages)
        stages = " | ".join(
            f"stage {k}: {len(peers.get(k, []))} peers, "
            f"{sum((p.record.throughput_ema or p.record.throughput) for p in peers.get(k, [])):.0f} samples/s, "
            f"epoch {max((p.record.step for p in peers.get(k, [])), default=0)}"
            for k in range(cfg.model.stages))
        progress = _trainer_progress(len(trainers), run_dir, cfg.train.max_steps)
        logger.info("%s || %s", " ; ".join(progress) or "trainers starting", stages)
        for _ in range(int(cfg.demo.demo_refresh * 10)):
            if not any(t.alive() for t in trainers) or stop:
                break
            time.sleep(0.1)
    for t in trainers:
        try:
            t.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            t.signal(signal.SIGKILL)


def _forget_one_exited(children: list[Child], trainers: list[Child]) -> None:
    """Log the first child that exited (trainers aside) and drop it from ``children``."""
    for child in children:
        if child not in trainers and not child.alive():
            logger.warning("%s exited with code %s (see %s)", child.name, child.proc.returncode, child.log)
            child.close()
            children.remove(child)
            break


def _trainer_progress(trainers: int, run_dir: Path, max_steps: int) -> list[str]:
    """A progress line for each trainer that has logged a training step."""
    progress = []
    for i in range(trainers):
        last = _last_record(run_dir / f"trainer{i}" / "metrics.jsonl")
        if last:
            progress.append(f"trainer{i} step {last['step']}/{max_steps} loss {last['loss']:.3f} "
                            f"{human(last['tokens_per_s'])} tok/s retries {last['retries']}")
    return progress


def _last_record(path: Path) -> dict | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        record = json.loads(line)
        if record.get("kind") == "train":
            return record
    return None


def _stop_all(children: list[Child]) -> None:
    """Trainers and stage peers first (graceful leave), the bootstrap last; SIGKILL whatever lingers."""
    order = [c for c in children if c.name != "bootstrap"] + [c for c in children if c.name == "bootstrap"]
    names = {child.proc.pid: child.name for child in order}
    stop_all([child.proc for child in order], LEAVE_TIMEOUT_S, term_group=False,
             on_kill=lambda proc: logger.warning("%s did not leave in time; killing it", names[proc.pid]))
    for child in order:
        child.close()


def _summary(run_id: str, run_dir: Path, cfg: RunConfig, results: list, peers: list[dict], stop: StopFlag) -> dict:
    results = [r for r in results if r]
    if not results:
        raise SwarmError(f"no trainer finished; see the logs in {run_dir / 'logs'}")
    batches = stage_batches(peers)
    return {
        "kind": "summary", "command": "demo", "run_id": run_id, "preset": cfg.model.preset,
        "stages": cfg.model.stages, "peers_per_stage": cfg.demo.peers_per_stage, "trainers": len(results),
        "steps": [r["steps"] for r in results], "first_loss": results[0]["first_loss"],
        "final_loss": results[0]["final_loss"], "val_loss": results[0]["val_loss"],
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in results if r["tokens_per_s"] == r["tokens_per_s"]), 1),
        "retries": sum(r["retries"] for r in results), "failures": sum(r["failures"] for r in results),
        "lost_microbatches": sum(r["lost_microbatches"] for r in results),
        "peers_seen_per_stage": results[0]["peers_per_stage"], "stopped_by": stop.signal_name if stop else None,
        # what each stage's optimizer steps held (the target is --batch-size)
        "batch_size": cfg.train.batch_size, "stage_steps": {k: len(v) for k, v in batches.items()},
        "stage_batch_median": {k: statistics.median(v) for k, v in batches.items() if v},
        "stage_batch_mean": {k: round(statistics.fmean(v), 1) for k, v in batches.items() if v},
        "metrics": [str(run_dir / f"trainer{i}" / "metrics.jsonl") for i in range(len(results))],
        "logs": str(run_dir / "logs"),
    }
