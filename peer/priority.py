"""Keep a process's helper processes out of the way of its compute and serving threads.

A stage peer starts helper processes: hivemind's DHT node and averagers (forked processes)
and their libp2p daemons (``p2pd``). They need little CPU, but whenever they wake up on a
busy machine the scheduler gives them a core at the expense of the compute thread, which
stalls the whole pipeline behind it. With a higher nice value they still run whenever a
core is free and still get a share under load, only after the compute and gRPC threads.

Measured on 2 cores (llama-14m, 2 stages x 1 peer, 1 trainer, ``benchmarks/swarm_vs_baseline.py``'s
setup), five interleaved pairs of runs with the helpers at nice 0 and at nice 10: tokens/s +2% to
+15% at nice 10, +9% in the median pair.
Linux only (nice values are per thread there: every thread of every helper is set); a no-op
elsewhere. Raising a nice value needs no privilege; nothing here ever lowers one.
"""

from __future__ import annotations

import logging
import os
import sys

from peer.processes import descendants

logger = logging.getLogger(__name__)


def lower_background_priority(nice: int) -> int:
    """Raise every thread of every process below this one to at least ``nice``; call again after
    starting more helpers (threads they start later inherit the value).

    :returns: how many threads were changed (0 with ``nice`` 0, or off Linux)
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return 0
    changed = 0
    for pid in descendants():
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                    changed += 1
            except OSError as e:  # the thread ended meanwhile, or belongs to another user
                logger.debug("cannot renice thread %d of process %d: %s", tid, pid, e)
    if changed:
        logger.debug("%d helper thread(s) now run at nice %d", changed, nice)
    return changed
