"""A stage's gradient rounds keep to its members: a stranger that knows the collaboration's prefix (its matchmaking
keys are unsigned) and joins a round with huge gradients is turned away when it asks a member to lead it, and is
never asked to lead (a group that holds it anyway is refused); its gradients never reach a member's, and the
members average with each other. Without the restriction (the control) the same
stranger is averaged in. Real hivemind averagers on a local DHT; the stranger runs the members' own class."""

from __future__ import annotations

import logging

import pytest
import torch

from dht.testing import LocalSwarm
from peer.stage.hivemind_ext import GroupSizedGradientAverager
from waiting import wait_until

RUN = "members"
PREFIX = f"{RUN}_stage0_grad_averager"
MATCHMAKING_S = 3.0  # long enough for the second ones to start and ask the first ones
ROUND_S = 12.0  # a round (with hivemind's retries after a refused group) fails after this
MEMBERS, STRANGER = (1.0, 2.0), 1000.0  # each peer's gradient: every element the same


@pytest.fixture
def local_swarm(tmp_path):
    """Three DHT nodes, and the warnings of peer.stage.hivemind_ext in a file: the averagers log in processes of
    their own (forked with this handler)."""
    log = tmp_path / "hivemind_ext.log"
    handler = logging.FileHandler(log)
    ext_logger = logging.getLogger("peer.stage.hivemind_ext")
    ext_logger.addHandler(handler)
    swarm = LocalSwarm(RUN, size=3)
    averagers = []
    yield swarm, averagers, log
    for averager in averagers:
        averager.shutdown()
    swarm.close()
    ext_logger.removeHandler(handler)
    handler.close()


def _averager(dht, value: float, **kwargs) -> GroupSizedGradientAverager:
    param = torch.nn.Parameter(torch.zeros(16))
    averager = GroupSizedGradientAverager([param], dht=dht, prefix=PREFIX, start=True, target_group_size=3,
                                          min_matchmaking_time=MATCHMAKING_S, request_timeout=1.0,
                                          allreduce_timeout=ROUND_S, **kwargs)
    param.grad = torch.full_like(param, value)
    averager.accumulate_grads_(1)
    return averager


def _declared(dht, averagers) -> bool:
    """All ``averagers`` are looking for a group: hivemind's matchmaking declares them under its group key."""
    found = dht.get(f"{PREFIX}.0b", latest=True)
    looking = {key for key, item in found.value.items() if item.value} if found is not None else set()
    return all(a.peer_id.to_bytes() in looking for a in averagers)


def _round(dht, members, stranger, stranger_leads: bool) -> None:
    """One round: the first ones start looking (and lead: the earliest declared expiration leads), the others once
    the first ones' declarations are in the DHT; returns when the members' steps have ended (averaged or failed)."""
    first, then = ([stranger], members) if stranger_leads else (members, [stranger])
    controls = {a: a.step(weight=1.0, timeout=ROUND_S, wait=False) for a in first}
    wait_until(lambda: _declared(dht, first), MATCHMAKING_S, "the first averagers' matchmaking declarations")
    controls.update({a: a.step(weight=1.0, timeout=ROUND_S, wait=False) for a in then})
    for averager in members:
        try:
            controls[averager].result(ROUND_S + 10)
        except Exception:  # a failed round: the peer keeps its local gradients
            pass
    if not controls[stranger].done():
        controls[stranger].cancel()  # left without a group: no need to wait out its timeout


def _value(averager) -> float:
    with averager.get_tensors() as (grad,):
        assert torch.equal(grad, torch.full_like(grad, grad[0].item())), grad
        return round(grad[0].item(), 3)


@pytest.mark.parametrize("restricted", [True, False], ids=["members", "control"])
@pytest.mark.parametrize("stranger_leads", [True, False], ids=["stranger-leads", "stranger-asks"])
def test_a_stranger_never_joins_the_members_round(local_swarm, stranger_leads, restricted):
    swarm, averagers, log = local_swarm
    a, b = (_averager(swarm.nodes[i].dht, value) for i, value in enumerate(MEMBERS))
    stranger = _averager(swarm.nodes[2].dht, STRANGER)
    averagers += [a, b, stranger]
    a.set_members([b.peer_id.to_base58()] if restricted else None)  # its own id is always a member
    b.set_members([a.peer_id.to_base58()] if restricted else None)

    _round(swarm.nodes[0].dht, [a, b], stranger, stranger_leads)

    got = (_value(a), _value(b))
    if not restricted:  # the control: the stranger's gradients were averaged into the members'
        assert got == (round(sum([*MEMBERS, STRANGER]) / 3, 3),) * 2, got
        return
    together = round(sum(MEMBERS) / 2, 3)
    assert got == (together, together), got  # the members averaged with each other, and only that
    if stranger_leads:  # not asked to lead: the members skipped it as if it did not answer
        expected = f"not asking {stranger.peer_id.to_base58()} to lead a gradient round"
    else:  # it asked a member to lead it: turned away
        expected = f"turned {stranger.peer_id.to_base58()} away from a gradient round"
    logged = log.read_text()
    assert expected in logged, logged


def test_a_group_that_holds_a_stranger_is_refused(local_swarm):
    """A member whose stage-mate leads without the restriction (say an older version) joins that group, finds the
    stranger in it and refuses the round: it keeps its own gradients."""
    swarm, averagers, log = local_swarm
    a, b = (_averager(swarm.nodes[i].dht, value) for i, value in enumerate(MEMBERS))
    stranger = _averager(swarm.nodes[2].dht, STRANGER)
    averagers += [a, b, stranger]
    a.set_members([b.peer_id.to_base58()])  # b lets anyone in
    controls = {b: b.step(weight=1.0, timeout=ROUND_S, wait=False)}  # b declares first: it leads
    wait_until(lambda: _declared(swarm.nodes[0].dht, [b]), MATCHMAKING_S, "b's matchmaking declaration")
    controls[stranger] = stranger.step(weight=1.0, timeout=ROUND_S, wait=False)
    wait_until(lambda: _declared(swarm.nodes[0].dht, [b, stranger]) or controls[b].done(), MATCHMAKING_S,
               "the stranger's matchmaking declaration")
    controls[a] = a.step(weight=1.0, timeout=ROUND_S, wait=False)
    for averager in (a, b):
        try:
            controls[averager].result(ROUND_S + 10)
        except Exception:  # a failed round: the peer keeps its local gradients
            pass
    if not controls[stranger].done():
        controls[stranger].cancel()
    assert _value(a) == MEMBERS[0]  # not averaged with the stranger (334.333 without the check)
    logged = log.read_text()
    assert f"refused a gradient round with {stranger.peer_id.to_base58()}" in logged, logged


@pytest.mark.parametrize("capped", [True, False], ids=["capped", "control"])
def test_a_mate_s_weight_is_clamped_in_the_parts_a_member_reduces(local_swarm, capped):
    """b sends its gradients at weight 1,000; a caps b at 1 (what b's signed progress would show): in the parts a
    reduces, b weighs 1 (mean 1.5). b runs in client mode, so that a reduces every part: a part's owner reduces
    it with its own weight, out of reach of the others' caps."""
    swarm, averagers, log = local_swarm
    a = _averager(swarm.nodes[0].dht, MEMBERS[0])
    b = _averager(swarm.nodes[1].dht, MEMBERS[1], client_mode=True)
    averagers += [a, b]
    for averager in (a, b):
        averager.set_target_group_size(2)
    if capped:
        a.set_weight_caps({b.peer_id.to_base58(): 1.0}, default=1.0)
    controls = [a.step(weight=1.0, timeout=ROUND_S, wait=False), b.step(weight=1000.0, timeout=ROUND_S, wait=False)]
    for control in controls:
        assert len(control.result(ROUND_S + 10)) == 2  # averaged together
    with a.get_tensors() as (grad,):
        values = {round(v, 3) for v in grad.tolist()}
    heavy = round((MEMBERS[0] + 1000 * MEMBERS[1]) / 1001, 3)
    if capped:
        assert values == {round(sum(MEMBERS) / 2, 3)}, values
        logged = log.read_text()
        assert f"clamped the averaging weight of {b.peer_id.to_base58()}" in logged, logged
    else:
        assert values == {heavy}, values


def test_weight_caps_follow_the_signed_progress_records():
    from types import SimpleNamespace

    from hivemind.p2p import PeerID

    from peer.stage.hivemind_ext import reported_samples, weight_caps

    ids = [PeerID.from_base58(p) for p in ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
                                           "QmPNK6SvJ3qR4okCRsWG2w7eciCzccASfmat6FoHrSRc8b")]

    def record(peer, epoch, samples, written=100.0):
        return SimpleNamespace(value={"peer_id": peer.to_bytes(), "epoch": epoch, "samples_accumulated": samples,
                                      "samples_per_second": 1.0, "time": written, "client_mode": False})

    reported = reported_samples({b"a": record(ids[0], 7, 6), b"b": record(ids[1], 6, 100),
                                 b"c": SimpleNamespace(value=3)})
    assert weight_caps(reported, 7, ceiling=8.0, now=101.0) == {ids[0].to_base58(): 8.0}  # 2 x 6, at most the batch
    assert weight_caps(reported, 6, ceiling=1000.0, now=101.0) == {ids[1].to_base58(): 200.0}
    assert weight_caps(reported, 6, ceiling=1000.0, now=200.0) == {}  # stale records cap nothing
    empty = reported_samples({b"a": record(ids[0], 7, 0)})
    assert weight_caps(empty, 7, ceiling=8.0, now=101.0) == {ids[0].to_base58(): 2.0}  # an empty replica passes


def test_a_weight_that_is_no_weight_is_zeroed():
    from hivemind.proto import averaging_pb2

    from peer.stage.hivemind_ext import GroupSizedGradientAverager as Averager
    from stage_helpers import run_async

    class Peer:
        @staticmethod
        def to_base58():
            return "QmLiar"

    async def weights(*sent):
        async def stream():
            for w in sent:
                yield averaging_pb2.AveragingData(weight=w)
        return [m.weight async for m in Averager._capped(stream(), 8.0, Peer())]

    got = run_async(weights(3.0, 8.0, 1e9, -1e9, float("nan")))
    assert got == [3.0, 8.0, 8.0, 0.0, 0.0], got
