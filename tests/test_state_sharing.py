"""Newcomers that download a stage's state at the same time spread over its donors: a donor serves
one download at a time and turns the others away to the next donor (real hivemind averagers on a
local DHT; each donor holds its upload open for a while, as a large state on a slow link would)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from dht.testing import LocalSwarm
from peer.stage.hivemind_ext import StageStateAverager
from waiting import wait_until

pytestmark = pytest.mark.slow
RUN = "sharing"
PREFIX = f"{RUN}_stage0_state_averager"
HOLD_S = 2.0  # how long a donor keeps each upload open


class SlowDonor(StageStateAverager):
    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        async for message in super().rpc_download_state(request, context):
            await asyncio.sleep(HOLD_S)  # the upload is under way (and counted), nothing sent yet
            yield message


def _averager(cls, dht, value: float, priority: float | None, epoch: int = 0, tensors: int = 1, **kwargs):
    """A donor (``priority`` set: sharing on) or a newcomer (sharing off, StageStateAverager's default)."""
    params = [torch.nn.Parameter(torch.full((64,), value)) for _ in range(tensors)]
    averager = cls(dht=dht, prefix=PREFIX, optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                   params=params, start=True, request_timeout=HOLD_S + 8, declare_state_period=30,
                   min_matchmaking_time=1.0, **kwargs)
    averager.local_epoch = epoch
    if priority is not None:
        averager.state_sharing_priority = priority
        averager.allow_state_sharing = True
    return averager, params[0]


@pytest.fixture
def local_swarm():
    swarm = LocalSwarm(RUN, size=4)
    averagers = []
    yield swarm, averagers
    for averager in averagers:
        averager.shutdown()
    swarm.close()


def _wait_declared(dht, count: int) -> None:
    def declared() -> bool:
        found = dht.get(f"{PREFIX}.all_averagers", latest=True)
        return found is not None and sum(1 for v in found.value.values() if v.value is not None) >= count

    wait_until(declared, 20, f"{count} donors declared", period=0.2)


def _download_together(joiners) -> list[bool]:
    with ThreadPoolExecutor(len(joiners)) as pool:
        list(pool.map(lambda j: j[0].load_state_from_peers(timeout=HOLD_S + 8), joiners))
    return [j[0].last_download_ok for j in joiners]


def test_joiners_at_once_spread_over_the_donors(local_swarm):
    swarm, averagers = local_swarm
    donors = [_averager(SlowDonor, swarm.nodes[i].dht, value, priority=5.0) for i, value in ((0, 1.0), (1, 2.0))]
    joiners = [_averager(StageStateAverager, swarm.nodes[i].dht, 0.0, priority=None) for i in (2, 3)]
    averagers += [a for a, _ in donors + joiners]
    _wait_declared(swarm.nodes[2].dht, 2)

    assert _download_together(joiners) == [True, True]
    got = sorted(param[0].item() for _, param in joiners)
    assert got == [1.0, 2.0], f"both newcomers downloaded from the same donor: {got}"
    assert all(torch.equal(p, torch.full_like(p, p[0].item())) for _, p in joiners)


def test_a_busy_donor_turns_the_second_joiner_away_until_it_is_free(local_swarm):
    swarm, averagers = local_swarm
    donor = _averager(SlowDonor, swarm.nodes[0].dht, 3.0, priority=5.0)
    joiners = [_averager(StageStateAverager, swarm.nodes[i].dht, 0.0, priority=None) for i in (1, 2)]
    averagers += [a for a, _ in [donor, *joiners]]
    _wait_declared(swarm.nodes[1].dht, 1)

    outcome = _download_together(joiners)
    assert sorted(outcome) == [False, True], outcome  # one got the state, the other was turned away
    turned_away = joiners[outcome.index(False)]
    assert turned_away[1][0].item() == 0.0  # nothing half-loaded
    turned_away[0].load_state_from_peers(timeout=HOLD_S + 8)  # the donor is free again
    assert turned_away[0].last_download_ok and turned_away[1][0].item() == 3.0


def test_a_download_may_take_longer_than_the_wait_for_a_chunk(local_swarm):
    """A stage's state on a slow link takes minutes; only a donor that stalls between chunks is dropped. The peers
    rely on this: --state-download-timeout bounds the whole download, a third of --averaging-timeout one chunk."""
    swarm, averagers = local_swarm
    donor = _averager(SlowDonor, swarm.nodes[0].dht, 3.0, priority=5.0, tensors=3)
    joiner = _averager(StageStateAverager, swarm.nodes[1].dht, 0.0, priority=None, tensors=3,
                       next_chunk_timeout=1.5 * HOLD_S)
    averagers += [donor[0], joiner[0]]
    _wait_declared(swarm.nodes[1].dht, 1)

    started = time.monotonic()
    joiner[0].load_state_from_peers(timeout=10 * HOLD_S)
    took = time.monotonic() - started
    assert joiner[0].last_download_ok and joiner[1][0].item() == 3.0
    assert took > 2 * 1.5 * HOLD_S, took  # three chunks, HOLD_S apart: twice the wait for one chunk


def test_a_donor_that_dies_mid_download_is_replaced_by_the_next(local_swarm):
    import os
    import signal
    import threading

    swarm, averagers = local_swarm
    first = _averager(SlowDonor, swarm.nodes[0].dht, 1.0, priority=6.0)  # the newcomer asks this one first
    second = _averager(SlowDonor, swarm.nodes[1].dht, 2.0, priority=5.0)
    joiner = _averager(StageStateAverager, swarm.nodes[2].dht, 0.0, priority=None)
    averagers += [first[0], second[0], joiner[0]]
    _wait_declared(swarm.nodes[2].dht, 2)

    download = threading.Thread(target=lambda: joiner[0].load_state_from_peers(timeout=HOLD_S + 8))
    download.start()
    threading.Event().wait(HOLD_S / 2)  # the first donor is now holding its upload open
    os.kill(first[0].pid, signal.SIGKILL)
    download.join(timeout=4 * HOLD_S + 10)
    assert not download.is_alive()
    assert joiner[0].last_download_ok and joiner[1][0].item() == 2.0


def test_a_state_behind_ours_is_refused_and_a_newcomer_shares_nothing(local_swarm):
    swarm, averagers = local_swarm
    behind = _averager(StageStateAverager, swarm.nodes[0].dht, 1.0, priority=5.0, epoch=2)
    ahead = _averager(StageStateAverager, swarm.nodes[1].dht, 0.0, priority=None, epoch=7)
    newcomer = _averager(StageStateAverager, swarm.nodes[2].dht, 0.0, priority=None)
    averagers += [behind[0], ahead[0], newcomer[0]]
    _wait_declared(swarm.nodes[1].dht, 1)

    ahead[0].load_state_from_peers(timeout=HOLD_S + 8)  # a state arrives, epoch 2 < 7: hivemind refuses it
    assert not ahead[0].last_download_ok and ahead[1][0].item() == 0.0 and ahead[0].local_epoch == 7
    found = swarm.nodes[2].dht.get(f"{PREFIX}.all_averagers", latest=True)
    assert len(found.value) == 1  # only the donor is declared: the newcomers share nothing yet
    newcomer[0].load_state_from_peers(timeout=HOLD_S + 8)
    assert newcomer[0].last_download_ok and newcomer[1][0].item() == 1.0


def test_a_state_with_nan_is_refused_and_nothing_is_loaded(local_swarm):
    swarm, averagers = local_swarm
    broken = _averager(StageStateAverager, swarm.nodes[0].dht, float("nan"), priority=5.0, epoch=3)
    newcomer = _averager(StageStateAverager, swarm.nodes[1].dht, 0.0, priority=None)
    averagers += [broken[0], newcomer[0]]
    _wait_declared(swarm.nodes[1].dht, 1)
    newcomer[0].load_state_from_peers(timeout=HOLD_S + 8)
    assert not newcomer[0].last_download_ok
    assert torch.equal(newcomer[1].detach(), torch.zeros(64)) and newcomer[0].local_epoch == 0
    with torch.no_grad():
        broken[1].fill_(4.0)  # mended: the same donor's state now loads
    newcomer[0].load_state_from_peers(timeout=HOLD_S + 8)
    assert newcomer[0].last_download_ok and newcomer[1][0].item() == 4.0 and newcomer[0].local_epoch == 3


def test_both_averagers_of_a_stage_get_the_averager_options(local_swarm):
    """hivemind.Optimizer gives ``averager_opts`` to its state averager only; the stage's gradient averager needs
    them too (a request timeout under the matchmaking time, or matchmaking can deadlock)."""
    from peer.config import load_config
    from peer.stage.averaging import StageOptimizer

    swarm, _ = local_swarm
    cfg = load_config({"preset": "tiny", "matchmaking_time": 1.5, "averaging_timeout": 6.0,
                       "state_download_timeout": 90.0})
    optimizer = StageOptimizer(swarm.nodes[0].dht, RUN, 0, torch.nn.Linear(4, 4), cfg, me="me", mates=lambda: [])
    try:
        # a whole download gets --state-download-timeout, not the all-reduce's timeout (a big stage on a slow link
        # could never be downloaded within it); a stalled donor: a third of --averaging-timeout between chunks
        assert optimizer.opt.load_state_timeout == 90.0
        assert optimizer.opt.state_averager.next_chunk_timeout == 2.0
        for averager in (optimizer.opt.state_averager, optimizer.opt.grad_averager):
            options = averager.matchmaking_kwargs
            assert options["min_matchmaking_time"] == 1.5 and options["request_timeout"] == 0.5, options
            assert averager.declare_state_period == 10.0
    finally:
        optimizer.shutdown()
