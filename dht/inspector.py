"""``swarm-peer inspect``: one look at a run as the DHT sees it.

:func:`snapshot` reads the run's config record and every stage key and returns one
JSON-able object (the ``--json`` output); :func:`render` turns it into a table per stage
with per-stage totals, the bottleneck marked, a table of the trainers' counters (retries,
failures, bans, waits, recovery, lost microbatches), and warnings; :func:`watch` repeats both.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Any, Callable, TextIO

from hivemind.utils.timed_storage import get_dht_time

from dht.node import SwarmNode
from dht.peers import LivePeer, read_stages
from dht.records import LIVE_STATES, PeerState
from dht.runconfig import fetch_run_config
from dht.trainers import read_trainers

logger = logging.getLogger(__name__)


def _peer_json(peer: LivePeer, now: float) -> dict[str, Any]:
    r = peer.record
    return {
        "peer_id": peer.peer_id, "state": r.state.value, "endpoint": r.endpoint, "public_name": r.public_name,
        "throughput": r.throughput, "throughput_ema": r.throughput_ema,
        "queue": r.queue, "inflight": r.inflight, "version": r.version, "step": r.step,
        "fingerprint": r.fingerprint, "auto_stage": r.auto_stage, "moves": r.moves, "moved_at": r.moved_at,
        "tls_sha256": r.tls_sha256,
        "age_s": round(peer.age_s(now), 1),
        "expires_in_s": round(peer.expires_in_s(now), 1), "stale": peer.stale(now),
    }


def snapshot(node: SwarmNode, default_stages: int, timeout: float = 30.0, owner: str | None = None) -> dict[str, Any]:
    """The run as one JSON-able object.

    :param default_stages: stages to read when the run has no config record (``--stages``)
    :param owner: the run owner's peer id; only its config record is read (None: the run's config is not read)
    :returns: ``{"run", "config_hash", "num_stages", "peers", "bottleneck", "read_s", "stages": [{"stage",
      "throughput", "online", "peers": [{"peer_id", "state", "endpoint", "throughput", "queue", "inflight",
      "version", "age_s", ...}]}], "trainers": [{"trainer_id", "state", "steps", "retries", "failures", "bans",
      "waits", "recoveries", "max_recovery_s", "lost", ...}], "warnings": [...]}``; stage throughput is the sum
      over ONLINE peers of their live samples/s (``throughput_ema``), or what they announced before they had one
    """
    start = time.perf_counter()
    config = fetch_run_config(node, owner, timeout) if owner else None
    num_stages = int(config.config.get("stages", default_stages)) if config else default_stages
    by_stage = read_stages(node, range(num_stages), timeout)
    now = get_dht_time()
    warnings = [] if config else [f"no config record of run {node.run_id!r} signed by its owner {owner}: is its "
                                  f"bootstrap running with --run-id {node.run_id}, and is the first --initial-peers "
                                  f"address its own (else pass --run-owner)? (showing {num_stages} stages)"]
    stages, versions = [], collections.Counter()
    for k in range(num_stages):
        peers = [p for p in by_stage[k] if p.record.state in LIVE_STATES and p.expires_at > now]
        online = [p for p in peers if p.record.state == PeerState.ONLINE]
        # a stage's capacity as rebalancing sees it: each peer's live figure once it has one, else its prior
        capacity = sum(p.record.throughput_ema or p.record.throughput for p in online)
        stages.append({"stage": k, "throughput": round(capacity, 3),
                       "online": len(online), "peers": [_peer_json(p, now) for p in peers]})
        if not online:
            warnings.append(f"stage {k} has no online peer" + (f" ({len(peers)} joining/draining)" if peers else ""))
        for p in peers:
            versions[p.record.version] += 1
            if p.stale(now):
                warnings.append(f"peer {p.peer_id} (stage {k}) missed its refresh: its record expires in "
                                f"{max(0.0, p.expires_in_s(now)):.0f} s")
            if config and p.record.fingerprint and p.record.fingerprint != config.hash:
                warnings.append(f"peer {p.peer_id} (stage {k}) announces config hash {p.record.fingerprint}, "
                                f"not the run's {config.hash}")
    if len(versions) > 1:
        warnings.append("peers run different versions: " + ", ".join(f"{v} ({n})" for v, n in sorted(versions.items())))
    trainers = [{"owner": t.owner, **t.record.model_dump(mode="json"), "expires_in_s": round(t.expires_at - now, 1)}
                for t in read_trainers(node, timeout)]
    for t in trainers:
        if t["lost"]:
            warnings.append(f"trainer {t['trainer_id']} lost {t['lost']} microbatches")
        if t["caught"]:
            warnings.append(f"trainer {t['trainer_id']} caught {t['caught']} wrong result(s) in {t['checks']} checks; "
                            f"it routes around {', '.join(t['distrusted']) or '(none named)'}")
    bottleneck = min(range(num_stages), key=lambda k: stages[k]["throughput"]) if num_stages else None
    return {
        "run": node.run_id, "config_hash": config.hash if config else None,
        "preset": config.config.get("preset") if config else None, "num_stages": num_stages,
        "peers": sum(len(s["peers"]) for s in stages), "bottleneck": bottleneck,
        "read_s": round(time.perf_counter() - start, 3), "time": now, "stages": stages, "trainers": trainers,
        "warnings": warnings,
    }


COLUMNS = ("PEER", "STATE", "ENDPOINT", "NAME", "SAMPLES/S", "QUEUE", "INFLIGHT", "VERSION", "STEP", "AGE", "LIVE",
           "MOVES")
"""SAMPLES/S is what the peer measured at start (or was told), LIVE what it serves now (samples per busy second);
MOVES is `-` for a pinned peer (`--stage K`), else how often it moved to another stage."""
TRAINER_COLUMNS = ("TRAINER", "STATE", "STEPS", "MB DONE/SENT", "RETRIES", "FAILURES", "BANS", "WAITS",
                   "MAX RECOVERY S", "LOST", "TOK/S", "LOSS")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(rows: list[tuple[str, ...]], widths: list[int], indent: str = "  ",
           numeric: frozenset[int] = frozenset({4, 5, 6, 8, 10})) -> list[str]:
    """Rows as aligned text; the columns in ``numeric`` are right-justified (default: the peer table's)."""
    return [indent + "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]


def render(snap: dict[str, Any], color: bool = False) -> str:
    """The snapshot as text: a header, a table per stage with its total, the bottleneck marked, warnings."""
    bold, red, yellow, reset = ("\x1b[1m", "\x1b[31m", "\x1b[33m", "\x1b[0m") if color else ("",) * 4
    config = f"config {snap['config_hash']} ({snap['preset']}, {snap['num_stages']} stages)" if snap["config_hash"] \
        else "no config record"
    lines = [f"{bold}run {snap['run']}{reset} | {config} | {snap['peers']} peers | read in {snap['read_s']:.2f} s"]
    rows = {stage["stage"]: [(p["peer_id"], p["state"], p["endpoint"] or "-", p["public_name"] or "-",
                              f"{p['throughput']:.1f}", str(p["queue"]), str(p["inflight"]), p["version"],
                              str(p["step"]), _age(p["age_s"]),
                              "-" if p["throughput_ema"] is None else f"{p['throughput_ema']:.1f}",
                              f"auto {p['moves']}" if p["auto_stage"] else "-")
                             for p in stage["peers"]] for stage in snap["stages"]}
    every = [COLUMNS] + [row for stage_rows in rows.values() for row in stage_rows]
    widths = [max(len(row[i]) for row in every) for i in range(len(COLUMNS))]  # aligned across stages
    for stage in snap["stages"]:
        mark = f"  {red}<- bottleneck{reset}" if stage["stage"] == snap["bottleneck"] and snap["num_stages"] > 1 else ""
        n = len(stage["peers"])
        lines.append(f"{bold}stage {stage['stage']}{reset}: {n} peer{'s' if n != 1 else ''}, {stage['online']} online, "
                     f"{stage['throughput']:.1f} samples/s{mark}")
        if rows[stage["stage"]]:
            lines.extend(_table([COLUMNS] + rows[stage["stage"]], widths))
    trainers = snap.get("trainers") or []
    if trainers:
        lines.append(f"{bold}trainers{reset}: {len(trainers)}")
        rows = [TRAINER_COLUMNS] + [(t["trainer_id"], t["state"], str(t["steps"]), f"{t['microbatches_done']}/"
                                     f"{t['microbatches_sent']}", str(t["retries"]), str(t["failures"]), str(t["bans"]),
                                     str(t["waits"]), f"{t['max_recovery_s']:.1f}", str(t["lost"]),
                                     f"{t['tokens_per_s']:.0f}", "-" if t["loss"] is None else f"{t['loss']:.3f}")
                                    for t in trainers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(TRAINER_COLUMNS))]
        lines.extend(_table(rows, widths, numeric=frozenset()))
    if snap["warnings"]:
        lines.append(f"{yellow}warnings:{reset}")
        lines.extend(f"  - {w}" for w in snap["warnings"])
    return "\n".join(lines)


def watch(read: Callable[[], dict[str, Any]], show: Callable[[dict[str, Any]], str], period: float,
          stop: threading.Event | Callable[[], bool], out: TextIO = sys.stdout, in_place: bool = False) -> int:
    """Read and show every ``period`` seconds until ``stop``; a failed read is shown and retried.

    :returns: how many snapshots were shown
    """
    stopped = stop.is_set if isinstance(stop, threading.Event) else stop
    shown = 0
    while not stopped():
        try:
            text = show(read())
        except TimeoutError as e:
            text = f"(no answer from the DHT: {e}; retrying in {period:g} s)"
        out.write(("\x1b[H\x1b[J" if in_place else "") + text + "\n")
        out.flush()
        shown += 1
        deadline = time.monotonic() + period
        while not stopped() and time.monotonic() < deadline:
            time.sleep(min(0.2, period))
    return shown
