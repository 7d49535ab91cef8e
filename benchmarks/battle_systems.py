"""The three trainers of the battle test, each run inside an emulated world (``links.World``) for a fixed window.

* ``baseline``: ``swarm-peer baseline``, one emulated device; it sends nothing, so it runs in the host's own
  network (its figure is the same in every world with the same device).
* ``pipeline``: ``swarm-peer pipeline --nnodes 4``, one stage per emulated machine ``d0``..``d3``; stage 0 reads
  the data itself.
* ``swarm``: a bootstrap on ``boot``, one ``swarm-peer join`` per emulated machine ``d0``..``d3`` (2 stages x 2
  peers), one ``swarm-peer train`` on ``trainer`` (the data owner).

Every process gets ``--threads 1`` and its machine's ``--compute-slowdown``. A run measures from its first logged
step for ``window`` seconds, then stops its processes (SIGTERM, then SIGKILL to stragglers) and reads its
``metrics.jsonl``. Optional ``faults`` kill every process of one emulated machine (as if it vanished) on a
schedule and start it again later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from peer.processes import stop_all

SP = [sys.executable, "-m", "peer.cli"]
DEVICES = ("d0", "d1", "d2", "d3")
STARTUP_TIMEOUT_S = 300.0
TRAINER_STOP_S = 15.0  # a swarm trainer told to stop finishes its step; one still going then is aborted (its
# summary is lost: the compute fractions then count its whole life)
TRAINER_STOP_UNDER_FAULTS_S = 60.0  # under churn its summary is the result (lost microbatches, retries): wait longer


@dataclasses.dataclass
class Setup:
    """What every system of a scenario shares."""

    preset: str
    batch_size: int
    microbatch_size: int
    slowdowns: dict[str, float]  # emulated machine -> --compute-slowdown
    window: float  # seconds measured after the first logged step
    out: Path
    seq_len: int = 128
    codec: str = "none"
    in_flight: int = 8
    seed: int = 0
    baseline_windows: float = 2.0  # the baseline's window, in windows (one device: its steps take 4 times as long)
    averaging_timeout: float | None = None  # the swarm peers' --averaging-timeout (None: their default)

    def shared(self) -> list[str]:
        """The flags every system gets: model, data, optimizer. The partition is `balanced` for the pipeline and
        the swarm alike (the LM head counts as the layers it costs)."""
        return ["--preset", self.preset, "--seq-len", str(self.seq_len), "--batch-size", str(self.batch_size),
                "--microbatch-size", str(self.microbatch_size), "--max-steps", "100000", "--warmup-steps", "2",
                "--lr", "2e-3", "--min-lr", "2e-4", "--seed", str(self.seed)]


@dataclasses.dataclass
class Faults:
    """Kill one emulated machine's processes every ``every`` s (from the first logged step); start it again
    ``after`` s later."""

    every: float
    after: float
    seed: int = 0


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return [r for r in rows if r.get("kind") == "train" and "time" in r]


def last_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    for line in reversed(path.read_text().strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


class Proc:
    """A process in an emulated machine (or in the host's network: ``world`` None), logging to files."""

    def __init__(self, world, host: str | None, name: str, argv: list[str], logs: Path):
        self.name = name
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        env = {**os.environ, "SWARM_EXIT_WITH_PARENT": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
        command = world.command(host, argv) if world and host else argv
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.err.read_text()[-3000:] if self.err.exists() else ""

    def wait_for(self, needle: str, timeout: float = STARTUP_TIMEOUT_S, path: Path | None = None) -> str:
        path = path or self.err
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = path.read_text() if path.exists() else ""
            if needle in text:
                return text
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {needle!r}:\n{self.tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: no {needle!r} within {timeout:.0f} s:\n{self.tail()}")


def kill_machine(world, host: str) -> None:
    """SIGKILL every process in an emulated machine's namespace: the machine vanished."""
    out = subprocess.run(["ip", "netns", "pids", world.names[host]], capture_output=True, text=True, timeout=30)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def stop(procs: list[Proc], grace: float = 60.0) -> None:
    stop_all([p.proc for p in reversed(procs)], grace, term_group=False)


class Window:
    """The measured window of a run: CPU and link counters at its start and end, and the churn schedule."""

    def __init__(self, world, metrics: Path, procs: Callable[[], list[Proc]], setup: Setup, what: str):
        self.world, self.metrics, self.procs, self.setup, self.what = world, metrics, procs, setup, what

    def wait_first_step(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not read_rows(self.metrics):
            dead = [p for p in self.procs() if not p.alive()]
            if dead:
                raise RuntimeError(f"{self.what}: {dead[0].name} exited ({dead[0].proc.returncode}) before the first "
                                   f"step:\n{dead[0].tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.what}: no step within {timeout:.0f} s")
            time.sleep(0.3)

    def run(self, tick: Callable[[float], None] | None = None) -> dict:
        """Wait for the first step, then ``window`` seconds (calling ``tick(seconds since the start)``)."""
        self.wait_first_step()
        started, cpu0 = time.time(), cpu_times()
        wire0 = self.world.traffic() if self.world else None
        while time.time() - started < self.setup.window:
            if tick:
                tick(time.time() - started)
            time.sleep(0.25)
        ended, cpu1 = time.time(), cpu_times()
        wire1 = self.world.traffic() if self.world else None
        out = {"window_start": started, "window_end": ended,
               "cpu_utilisation": round((cpu1[0] - cpu0[0]) / max(1.0, cpu1[1] - cpu0[1]), 3)}
        if wire0 and wire1:
            out["wire_bytes"] = sum(wire1[h]["sent"] - wire0[h]["sent"] for h in wire1)
        return out


def summarise(rows: list[dict], window: dict, progress: bool = False) -> dict:
    """Tokens/s between the first step logged in the window and the last one (``progress``: from the window's first
    step to the window's end, so that time lost to a stalled or restarting system counts), and the loss curve."""
    inside = [r for r in rows if window["window_start"] - 1 <= r["time"] <= window["window_end"] + 1]
    out = {"steps_logged": len(inside), "curve": [(r["tokens"], round(r["loss"], 4)) for r in rows]}
    if len(inside) >= 2:
        first = inside[0]
        end = window["window_end"] if progress else inside[-1]["time"]
        done = max(r["tokens"] for r in inside) - first["tokens"]
        out["tokens_per_s"] = round(done / max(1e-9, end - first["time"]), 1)
        out["tokens_in_window"] = done
        if window.get("wire_bytes") is not None and done:
            out["wire_bytes_per_token"] = round(window["wire_bytes"] / done, 1)
    else:
        out["tokens_per_s"] = None
    return out


# ---- the systems ----

def run_baseline(setup: Setup, name: str = "baseline") -> dict:
    """The single-process baseline on a device like ``d0``, measured for ``baseline_windows`` windows."""
    setup = dataclasses.replace(setup, window=setup.baseline_windows * setup.window)
    root = setup.out / name
    root.mkdir(parents=True, exist_ok=True)
    slow = setup.slowdowns.get("d0", 1.0)
    proc = Proc(None, None, name, [*SP, "baseline", *setup.shared(), "--threads", "1", "--compute-slowdown",
                                   str(slow), "--run-dir", str(root / "run"), "--eval-interval", "0",
                                   "--log-interval", "1", "--no-progress", "--json", "--wandb-project",
                                   "swarm-battle"], root)
    try:
        window = Window(None, root / "run" / "metrics.jsonl", lambda: [proc], setup, name).run()
    finally:
        stop([proc])
    return {"system": name, **window, **summarise(read_rows(root / "run" / "metrics.jsonl"), window),
            "devices": 1, "compute_slowdown": slow}


def run_pipeline(world, setup: Setup, faults: Faults | None = None, name: str = "pipeline") -> dict:
    """A 4-stage 1F1B pipeline, one stage per machine (:func:`pipeline_placement`). Under ``faults`` a killed
    machine stops the pipeline (a static pipeline cannot route around it); the harness starts all of it again from
    the last checkpoint, as an operator or an elastic launcher would, once the machine is back."""
    root = setup.out / name
    (root / "logs").mkdir(parents=True, exist_ok=True)
    hosts = pipeline_placement(setup)
    master = world.address(hosts[0])
    procs: list[Proc] = []
    starts = {"n": 0}

    def start_all() -> None:
        starts["n"] += 1
        port = str(29500 + starts["n"])
        for rank, host in enumerate(hosts):
            procs.append(Proc(world, host, f"node{rank}-{starts['n']}", [
                *SP, "pipeline", *setup.shared(), "--stages", "4", "--partition", "balanced", "--nnodes", "4",
                "--node-rank", str(rank),
                "--master-addr", master, "--master-port", port, "--threads", "1", "--compute-slowdown",
                str(setup.slowdowns.get(host, 1.0)), "--run-dir", str(root / "run"), "--checkpoint-dir",
                str(root / "checkpoints"), "--checkpoint-interval", "2" if faults else "0", "--keep-checkpoints",
                "4", "--dist-timeout", "30", "--eval-interval", "0", "--log-interval", "1", "--no-progress",
                "--json", "--wandb-project", "swarm-battle", *(["--resume"] if starts["n"] > 1 else [])],
                root / "logs"))

    start_all()
    schedule = _Schedule(world, faults)

    def tick(now: float) -> None:
        if schedule.kill(now):
            # the other stages would fail on their own (gloo errors, or --dist-timeout); an elastic launcher that
            # notices at once is the pipeline's best case
            for host in DEVICES:
                kill_machine(world, host)
        if schedule.pending and not any(p.alive() for p in procs) and schedule.restart_due(now):
            start_all()
            schedule.events.append({"at_s": round(now, 1), "restarted": "all stages, --resume"})

    try:
        window = Window(world, root / "run" / "metrics.jsonl", lambda: procs, setup, name).run(tick if faults else None)
    finally:
        stop(procs)
    summary = last_json(procs[-1].out) or {}
    result = {"system": name, **window, **summarise(read_rows(root / "run" / "metrics.jsonl"), window,
                                                   progress=bool(faults)),
              "devices": 4, "events": schedule.events}
    if summary.get("stage_busy_s") and summary.get("train_time_s"):
        result["compute_fraction"] = [round(b / summary["train_time_s"], 3) for b in summary["stage_busy_s"]]
    return result


def pipeline_placement(setup: Setup) -> list[str]:
    """The machine of each pipeline stage: stage k on d<k> when the devices are alike; else the best static
    placement an operator who knows the devices would choose: the fastest devices on the costliest stages (costs
    from ``peer.partition.stage_costs``, the LM head's stage the costliest)."""
    if len(set(setup.slowdowns.values())) <= 1:
        return list(DEVICES)
    from peer.config.sections import DataConfig
    from peer.partition import stage_costs

    costs = stage_costs(setup.preset, DataConfig().vocab_size, setup.seq_len, len(DEVICES), "balanced")
    by_cost = sorted(range(len(DEVICES)), key=lambda k: -costs[k])
    by_speed = sorted(DEVICES, key=lambda h: setup.slowdowns.get(h, 1.0))
    hosts = [""] * len(DEVICES)
    for stage, host in zip(by_cost, by_speed, strict=True):
        hosts[stage] = host
    return hosts


class _Schedule:
    """When to kill which machine, and when to bring it back; what happened, in ``events``."""

    def __init__(self, world, faults: Faults | None):
        self.world, self.faults, self.events = world, faults, []
        self.rng = random.Random(faults.seed if faults else 0)
        self.next_kill = faults.every if faults else float("inf")
        self.pending: list[tuple[float, str]] = []

    def kill(self, now: float) -> str | None:
        """Kill the next machine if it is time (``now``: seconds into the window); returns it."""
        if now < self.next_kill:
            return None
        self.next_kill = now + self.faults.every
        victim = self.rng.choice(DEVICES)
        kill_machine(self.world, victim)
        self.events.append({"at_s": round(now, 1), "killed": victim})
        self.pending.append((now + self.faults.after, victim))
        return victim

    def restart_due(self, now: float) -> list[str]:
        due = [host for at, host in self.pending if at <= now]
        self.pending = [(at, host) for at, host in self.pending if at > now]
        return due


def run_swarm(world, setup: Setup, placement: dict[str, str], faults: Faults | None = None, name: str = "swarm",
              rebalance_period: float | None = None) -> dict:
    """Bootstrap on ``boot``, a stage peer on each machine (``placement``: machine -> ``--stage`` value; with
    ``rebalance_period`` the peers are ``--stage auto`` started in that stage), a trainer on ``trainer``."""
    root = setup.out / name
    (root / "logs").mkdir(parents=True, exist_ok=True)
    swarm = _Swarm(world, setup, placement, root, f"battle-{name}-{os.getpid()}", rebalance_period,
                   checkpoints=faults is not None)
    schedule = _Schedule(world, faults)

    def tick(now: float) -> None:
        schedule.kill(now)
        for host in schedule.restart_due(now):
            swarm.start_peer(host)
            schedule.events.append({"at_s": round(now, 1), "restarted": host})

    try:  # everything started is stopped, also when a start fails
        swarm.start()
        window = Window(world, root / "run" / "metrics.jsonl", lambda: [swarm.boot, swarm.trainer], setup,
                        name).run(tick if faults else None)
    finally:
        trainer_time = swarm.stop()
    rows = read_rows(root / "run" / "metrics.jsonl")
    result = {"system": name, **window, **summarise(rows, window, progress=bool(faults)), "devices": 4,
              "events": schedule.events,
              "trainer": _pick(last_json(swarm.trainer.out), "lost_microbatches", "retries", "steps")}
    ends = [last_json(p.out) for p in swarm.peers.values()]
    busy = [sum((e.get("compute_s") or {}).get(k, 0.0) for k in ("forward", "backward")) for e in ends if e]
    # the trainer's own training time (from its first microbatch), else its whole life
    train_time = (last_json(swarm.trainer.out) or {}).get("train_time_s") or trainer_time
    if busy:
        result["compute_fraction"] = [round(min(1.0, b / train_time), 3) for b in busy]
    result["moves"] = [m for e in ends if e for m in e.get("moves", [])]
    result.update(after_moves(rows, result["moves"], window))
    result["timeline"] = [{"t": round(r["time"] - window["window_start"], 1), "peers": r.get("peers_per_stage"),
                           "capacity": r.get("stage_throughput"), "tokens": r["tokens"]} for r in rows]
    return result


class _Swarm:
    """The processes of one swarm run: a bootstrap, a peer per machine (the latest one of each), a trainer."""

    def __init__(self, world, setup: Setup, placement: dict[str, str], root: Path, run_id: str,
                 rebalance_period: float | None, checkpoints: bool = False):
        """:param checkpoints: machines may vanish (churn): peers keep checkpoints, the trainer gets longer to stop"""
        self.world, self.setup, self.placement, self.root = world, setup, placement, root
        self.run_id, self.rebalance_period, self.checkpoints = run_id, rebalance_period, checkpoints
        self.procs: list[Proc] = []
        self.peers: dict[str, Proc] = {}
        self.boot = self.trainer = None
        self.common: list[str] = []
        self.trainer_started = time.time()

    def start(self) -> None:
        boot_addr = self.world.address("boot")
        self.boot = self._add(Proc(self.world, "boot", "bootstrap", [
            *SP, "bootstrap", "--run-id", self.run_id, "--host-maddrs", f"/ip4/{boot_addr}/tcp/0", "--update-period",
            "2", "--json", *self.setup.shared(), "--stages", "2", "--partition", "balanced"], self.root / "logs"))
        initial = json.loads(self.boot.wait_for("initial_peers", path=self.boot.out).splitlines()[0])
        self.common = ["--run-id", self.run_id, "--initial-peers", initial["initial_peers"][0], "--update-period", "2"]
        for host in DEVICES:
            self.start_peer(host)
        addr = self.world.address("trainer")  # it starts up while the peers do, and waits for their stages
        self.trainer_started = time.time()
        self.trainer = self._add(Proc(self.world, "trainer", "trainer", [
            *SP, "train", *self.common, "--host-maddrs", f"/ip4/{addr}/tcp/0", "--in-flight",
            str(self.setup.in_flight), "--codec", self.setup.codec, "--run-dir", str(self.root / "run"),
            "--eval-interval", "0", "--log-interval", "1", "--no-progress", "--json", "--wandb-project",
            "swarm-battle"], self.root / "logs"))
        for proc in list(self.peers.values()):
            proc.wait_for("peer ONLINE")

    def start_peer(self, host: str) -> Proc:
        stage, period = self.placement[host], self.rebalance_period
        where = (["--stage", "auto", "--initial-stage", stage, "--rebalance-period", str(period),
                  "--rebalance-cooldown", str(3 * period)] if period else ["--stage", stage])
        addr, n = self.world.address(host), len(self.procs)
        self.peers[host] = self._add(Proc(self.world, host, f"peer-{host}-{n}", [
            *SP, "join", *self.common, *where, "--host", addr, "--host-maddrs", f"/ip4/{addr}/tcp/0", "--threads",
            "1", "--compute-slowdown", str(self.setup.slowdowns.get(host, 1.0)), "--matchmaking-time", "1",
            "--codec", self.setup.codec, *(["--checkpoint-dir", str(self.root / f"ckpt-{n}")] if self.checkpoints
                                            else []), "--json",
            *(["--averaging-timeout", str(self.setup.averaging_timeout)] if self.setup.averaging_timeout else [])],
            self.root / "logs"))
        return self.peers[host]

    def _add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop(self) -> float:
        """The trainer first (it logs its summary), then the rest; returns the trainer's seconds."""
        took = time.time() - self.trainer_started
        if self.trainer is not None:
            self.trainer.proc.send_signal(signal.SIGTERM)
            try:
                self.trainer.proc.wait(TRAINER_STOP_UNDER_FAULTS_S if self.checkpoints else TRAINER_STOP_S)
            except subprocess.TimeoutExpired:
                pass
        stop(self.procs)
        return took


def after_moves(rows: list[dict], moves: list[dict], window: dict) -> dict:
    """Tokens/s from the first step logged after the last move had finished to the end of the window (the
    rebalanced swarm's own rate, without the time it spent moving)."""
    if not moves:
        return {}
    done = max(m["at"] + m["took_s"] for m in moves)
    after = [r for r in rows if done <= r["time"] <= window["window_end"] + 1]
    if len(after) < 2:
        return {}
    rate = (after[-1]["tokens"] - after[0]["tokens"]) / max(1e-9, after[-1]["time"] - after[0]["time"])
    return {"tokens_per_s_after_moves": round(rate, 1), "moves_done_s": round(done - window["window_start"], 1)}


def _pick(d: dict | None, *keys: str) -> dict:
    return {k: d.get(k) for k in keys} if d else {}
