"""A stage server with static wiring, in its own process: for tests, benchmarks and fault drills.

    python -m peer.stage.launch --preset tiny --vocab-size 512 --seq-len 32 \\
        --stage 0 --num-stages 2 --next 127.0.0.1:5001 [--port 0] [--delay 2.0]

Prints ``LISTENING <host:port>`` on stdout once it serves, then runs until SIGTERM/SIGINT
(graceful: in-flight hops finish) or SIGKILL. ``--delay`` adds seconds to every forward (and
prints ``FORWARD`` as each begins), to make a slow or about-to-die peer for fault tests. Users run
``swarm-peer join`` instead, which finds its neighbours in the DHT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

import torch

from peer.partition import build_stage
from peer.rpc.client import StaticNextHop
from peer.stage.runtime import StageRuntime, StageSpec
from peer.stage.server import StageServer


class Delayed(torch.nn.Module):
    """Wraps a stage module and sleeps before each forward (fault injection only). ``entered`` is set, and with
    ``announce`` a ``FORWARD`` line printed, as a forward begins, ``finished`` once one has returned: tests wait
    for those instead of guessing."""

    def __init__(self, inner: torch.nn.Module, seconds: float, announce: bool = False):
        super().__init__()
        self.inner, self.seconds, self.announce = inner, seconds, announce
        self.entered, self.finished = threading.Event(), threading.Event()

    def forward(self, x):
        self.entered.set()
        if self.announce:
            print("FORWARD", flush=True)
        time.sleep(self.seconds)
        out = self.inner(x)
        self.finished.set()
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--num-stages", type=int, required=True)
    p.add_argument("--run-id", default="swarm")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--next", action="append", default=[], metavar="HOST:PORT", help="next-stage peers (repeatable)")
    p.add_argument("--max-in-flight", type=int, default=16)
    p.add_argument("--delay", type=float, default=0.0, help="seconds of sleep before every forward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    module = build_stage(args.preset, args.vocab_size, args.seq_len, args.seed, args.stage, args.num_stages)
    spec = StageSpec(args.run_id, args.stage, args.num_stages, module.config.hidden_size, args.vocab_size,
                     max_seq_len=args.seq_len)
    if args.delay:
        module = Delayed(module, args.delay, announce=True)
    next_hop = StaticNextHop(args.next) if args.next else None
    server = StageServer(StageRuntime(module, spec), next_hop, host=args.host, port=args.port,
                         max_in_flight=args.max_in_flight).start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"LISTENING {server.address}", flush=True)
    stop.wait()
    finished = server.stop(grace=30)
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
