"""Is this machine's clock the swarm's? hivemind's records expire by wall-clock time, so a peer whose clock is far
off either sees every other record as expired (ahead) or writes records that others drop at once (behind).

Each stage record says when it was last written (``updated_at``): by an agreeing clock, never in the future. When
every other peer's last write lies more than :data:`MAX_SKEW_S` in this clock's future, it is this clock that is
behind (one peer with a fast clock, or a liar, cannot make every record look so while another agrees). A clock
that is ahead cannot be told from records that stopped being refreshed (a peer that died), and one far ahead sees
no record at all; the error for a run whose config record cannot be found mentions the clock.
"""

from __future__ import annotations

from typing import Iterable

from dht.errors import ControlPlaneError

MAX_SKEW_S = 30.0


def clock_lag(writes: Iterable[float], now: float) -> float | None:
    """How far this clock is at least behind the others', judged from their last writes (``updated_at``): the
    smallest distance into our future of any of them (0 when one is not in our future), None without any."""
    writes = list(writes)
    return max(0.0, min(writes) - now) if writes else None


def check_clock(writes: Iterable[float], now: float) -> None:
    """:raises ControlPlaneError: every other peer's last write lies more than :data:`MAX_SKEW_S` in our future"""
    writes = list(writes)
    lag = clock_lag(writes, now)
    if lag is not None and lag > MAX_SKEW_S:
        raise ControlPlaneError(
            f"this machine's clock is at least {lag:.0f} s behind the swarm's (judged from {len(writes)} "
            f"peer record(s)): hivemind's records expire by wall-clock time, so this peer would not see the others' "
            f"records or they would drop its own; sync the clock (e.g. `timedatectl set-ntp true`, chrony or ntpd) "
            f"and start again")
