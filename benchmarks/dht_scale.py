"""How the control plane scales: reading a run of 8 stages x N peers, and how soon a new record shows.

For each N a fresh localhost swarm of ``--nodes`` DHT nodes (the run's validators on each)
is started; ``8 x N`` fake-but-real peers (signed records, one owner key each) are announced
from one process; then

* ``read_s``: the inspector's read (config record + every stage key, ``latest=True``) from a
  client-mode node, the median of ``--reads`` reads, checked to list exactly ``8 x N`` peers;
* ``cli_s``: one ``swarm-peer inspect --json`` run end to end (process start included);
* ``visible_s``: from a new peer's first store on one node to its record being read on
  another, the median of ``--joins`` joins;
* ``announce_s``: the time to announce all ``8 x N`` records (8 writer threads).

The baseline in the same run is N = 4. Progress lines, then a JSON object on the last line.

    python benchmarks/dht_scale.py [--peers 4 16 64] [--nodes 3] [--reads 5] [--joins 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hivemind.utils.crypto import RSAPrivateKey

from dht.announce import Announcer, new_peer_record
from dht.inspector import snapshot
from dht.owner import peer_id_of
from dht.peers import read_stages
from dht.records import PeerState
from dht.runconfig import RunConfigKeeper
from dht.signing import key_id, owner_subkey
from dht.testing import FakePeers, LocalSwarm, make_keys

STAGES = 8
SWARM_PEER = Path(sys.executable).parent / "swarm-peer"


def time_visibility(swarm: LocalSwarm, reader, stage: int, joins: int) -> list[float]:
    """Seconds from a new peer's announce (on a node of its own) to its record being read on another node."""
    keys = make_keys(joins)
    writer = swarm.add_node(keys=keys)
    out = []
    for key in keys:
        wanted = key_id(owner_subkey(key))
        ann = Announcer(writer, new_peer_record(stage, "bench", state=PeerState.ONLINE, endpoint="127.0.0.1:1"),
                        update_period=600.0, key=key)
        start = time.perf_counter()
        ann.start()
        while not any(p.peer_id == wanted for p in read_stages(reader, [stage])[stage]):
            if time.perf_counter() - start > 60:
                raise RuntimeError("a new record stayed invisible for 60 s")
        out.append(time.perf_counter() - start)
        ann.abandon()
    return out


def measure(n: int, keys, args) -> dict:
    run_id = f"bench-n{n}"
    owner_key = RSAPrivateKey()  # the run's owner (a bootstrap's identity key)
    owner = peer_id_of(owner_key.get_public_key())
    with LocalSwarm(run_id, size=args.nodes) as swarm, \
            RunConfigKeeper(swarm.nodes[0], {"preset": "tiny", "stages": STAGES}, "bench", owner=owner,
                            signer=owner_key, update_period=600.0):
        start = time.perf_counter()
        fakes = FakePeers(swarm.initial_peers, run_id, STAGES, n, update_period=600.0, keys=keys[: STAGES * n])
        announce_s = time.perf_counter() - start
        try:
            reader = swarm.add_node(client_mode=True)
            reads = []
            for _ in range(args.reads):
                snap = snapshot(reader, STAGES, owner=owner)
                reads.append(snap["read_s"])
                if snap["peers"] != STAGES * n:
                    raise RuntimeError(f"inspect listed {snap['peers']} peers, expected {STAGES * n}")
            start = time.perf_counter()
            proc = subprocess.run([str(SWARM_PEER), "inspect", "--json", "--run-id", run_id,
                                   "--initial-peers", swarm.initial_peers[0], "--run-owner", owner],
                                  capture_output=True, text=True, timeout=300)
            cli_s = time.perf_counter() - start
            if proc.returncode != 0 or json.loads(proc.stdout)["peers"] != STAGES * n:
                raise RuntimeError(f"swarm-peer inspect failed: {proc.stderr[-500:]}")
            visible = time_visibility(swarm, swarm.nodes[1], stage=STAGES - 1, joins=args.joins)
        finally:
            fakes.close()
    return {"peers_per_stage": n, "records": STAGES * n, "announce_s": round(announce_s, 3),
            "read_s": round(statistics.median(reads), 4), "read_max_s": round(max(reads), 4),
            "cli_s": round(cli_s, 3), "visible_s": round(statistics.median(visible), 4),
            "visible_max_s": round(max(visible), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, nargs="+", default=[4, 16, 64], help="peers per stage (N)")
    p.add_argument("--nodes", type=int, default=3, help="DHT nodes in the swarm besides the announcer and reader")
    p.add_argument("--reads", type=int, default=5)
    p.add_argument("--joins", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    keys = make_keys(STAGES * max(args.peers))
    print(f"generated {len(keys)} RSA owner keys in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    for n in args.peers:
        row = measure(n, keys, args)
        results.append(row)
        print(f"N={n:>3} ({row['records']} records): announce {row['announce_s']:.2f} s, inspect read "
              f"{row['read_s'] * 1e3:.0f} ms (max {row['read_max_s'] * 1e3:.0f}), CLI {row['cli_s']:.2f} s, "
              f"new record visible after {row['visible_s'] * 1e3:.0f} ms (max {row['visible_max_s'] * 1e3:.0f})",
              flush=True)
    base = results[0]
    print(json.dumps({
        "benchmark": "dht_scale", "stages": STAGES, "nodes": args.nodes, "results": results,
        "read_s_ratio_vs_first": [round(r["read_s"] / base["read_s"], 2) for r in results],
    }))


if __name__ == "__main__":
    main()
