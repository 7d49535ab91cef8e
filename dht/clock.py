"""Is this machine's clock the swarm's? hivemind's records expire by wall-clock time, so a peer whose clock is far
off either sees every other record as expired (ahead) or writes records that others drop at once (behind).

Each stage record says when it was last written (``updated_at``): by an agreeing clock, never in the future. When
the median of at least :data:`MIN_WRITERS` other peers' last writes lies more than :data:`MAX_SKEW_S` in this
clock's future, it is this clock that is behind (a peer with a fast clock, or a liar, moves no median). A clock
that is ahead cannot be told from records that stopped being refreshed (a peer that died), and one far ahead sees
no record at all; the error for a run whose config record cannot be found mentions the clock.
"""

from __future__ import annotations

import statistics
from typing import Iterable

from dht.errors import ControlPlaneError

MAX_SKEW_S = 30.0
MIN_WRITERS = 3  # fewer other peers say too little (one fast clock would accuse every joiner)


def clock_lag(writes: Iterable[float], now: float) -> float | None:
    """How far this clock is behind the others', judged from their last writes (``updated_at``): how far into our
    future their median lies (0 when not), None with fewer than :data:`MIN_WRITERS` of them."""
    writes = list(writes)
    return max(0.0, statistics.median(writes) - now) if len(writes) >= MIN_WRITERS else None


def check_clock(writes: Iterable[float], now: float) -> None:
    """:raises ControlPlaneError: the others' median last write lies more than :data:`MAX_SKEW_S` in our future"""
    writes = list(writes)
    lag = clock_lag(writes, now)
    if lag is not None and lag > MAX_SKEW_S:
        raise ControlPlaneError(
            f"this machine's clock is at least {lag:.0f} s behind the swarm's (judged from {len(writes)} "
            f"peer record(s)): hivemind's records expire by wall-clock time, so this peer would not see the others' "
            f"records or they would drop its own; sync the clock (e.g. `timedatectl set-ntp true`, chrony or ntpd) "
            f"and start again")
