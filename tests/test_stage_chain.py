"""Stage servers on 127.0.0.1 wired statically: a microbatch through the chain matches the unpartitioned
model, updates never happen under a pending backward, and limits, deadlines and shutdown behave."""

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from peer.rpc import stage_pb2 as pb
from peer.rpc.client import HopFailed
from stage_helpers import fresh_stages, grads_of, max_diff, reference_grads, send, stage_chain, tokens
from waiting import wait_until
from peer.stage.launch import Delayed

V, T, B = 512, 32, 4
# relative error of the parameter gradients (all stages together) per codec, both directions
GRAD_TOLERANCE = {"fp16": 5e-3, "bf16": 3e-2, "int8": 6e-2}


@pytest.mark.parametrize("num_stages", [2, 3])
def test_chain_reproduces_unpartitioned_loss_and_grads_exactly(num_stages):
    x, y = tokens(V, B, T)
    ref_loss, ref_grads = reference_grads("llama-14m", V, T, x, y)
    stages = fresh_stages("llama-14m", V, T, num_stages)
    with stage_chain(stages, V) as servers:
        outcome = send(servers[0][0].address, x, y)
        infos = [s.servicer for group in servers for s in group]
    assert outcome.result.loss == pytest.approx(ref_loss, abs=1e-6)
    assert outcome.result.samples == B
    assert [t.stage for t in outcome.result.timings] == list(range(num_stages))
    assert all(t.total_s > 0 for t in outcome.result.timings)
    got = grads_of(stages)
    assert set(got) == set(ref_grads)
    assert max_diff(got, ref_grads) <= 1e-6
    assert all(s.runtime.samples_accumulated == B for s in infos)


def _relative(got, ref):
    num = sum((got[n] - ref[n]).float().pow(2).sum() for n in ref)
    den = sum(ref[n].float().pow(2).sum() for n in ref)
    return (num / den).sqrt().item()


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_compressed_links_stay_within_tolerance(codec):
    x, y = tokens(V, B, T, seed=1)
    ref_loss, ref_grads = reference_grads("llama-14m", V, T, x, y)
    stages = fresh_stages("llama-14m", V, T, 3)
    with stage_chain(stages, V) as servers:
        outcome = send(servers[0][0].address, x, y, codec=codec)
    assert outcome.result.loss == pytest.approx(ref_loss, rel=5e-3)
    assert _relative(grads_of(stages), ref_grads) <= GRAD_TOLERANCE[codec]


def test_forward_only_returns_the_loss_without_touching_gradients():
    x, y = tokens(V, B, T)
    ref_loss, _ = reference_grads("tiny", V, T, x, y)
    stages = fresh_stages("tiny", V, T, 2)
    with stage_chain(stages, V) as servers:
        outcome = send(servers[0][0].address, x, y, forward_only=True)
        accumulated = [g[0].runtime.samples_accumulated for g in servers]
    assert outcome.result.loss == pytest.approx(ref_loss, abs=1e-6)
    assert not grads_of(stages) and accumulated == [0, 0]


def test_updates_drain_and_never_run_under_a_pending_backward():
    stages = fresh_stages("tiny", V, T, 2)
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.1) for s in stages]

    def hook_for(k):
        async def on_backward(runtime, samples, late):
            if runtime.samples_accumulated >= 2 * B:
                def step():
                    optimizers[k].step()
                    optimizers[k].zero_grad(set_to_none=True)
                await runtime.apply_update(step)
        return {"on_backward": on_backward}

    with stage_chain(stages, V, runtime_kwargs={0: hook_for(0), 1: hook_for(1)},
                     server_kwargs={1: {}}) as servers:
        address = servers[0][0].address
        results, errors = [], []

        def worker(i):
            try:
                x, y = tokens(V, B, T, seed=i)
                results.append(send(address, x, y).result.loss)
            except Exception as e:  # collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        runtimes = [g[0].runtime for g in servers]
    assert not errors and len(results) == 12
    assert all(r.version_violations == 0 for r in runtimes)
    assert all(r.updates >= 4 for r in runtimes), [r.updates for r in runtimes]
    assert all(r.pending_backward == 0 for r in runtimes)


def test_in_flight_cap_answers_resource_exhausted_and_keeps_serving():
    stages = fresh_stages("tiny", V, T, 1)
    slow = Delayed(stages[0], 1.5)
    slow.config = stages[0].config
    with stage_chain([slow], V, server_kwargs={0: {"max_in_flight": 1}}) as servers:
        address = servers[0][0].address
        x, y = tokens(V, B, T)
        first = threading.Thread(target=send, args=(address, x, y))
        first.start()
        wait_until(slow.entered.is_set, timeout=30, what="the first hop inside its (slow) forward")
        with pytest.raises(HopFailed) as err:
            send(address, x, y, max_attempts=1)
        first.join(30)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in str(err.value)
        assert send(address, x, y).result.loss > 0


def test_deadline_is_honoured_and_the_server_keeps_serving():
    stages = fresh_stages("tiny", V, T, 2)
    slow = Delayed(stages[1], 3.0)
    slow.config = stages[1].config
    with stage_chain([stages[0], slow], V) as servers:
        x, y = tokens(V, B, T)
        with pytest.raises(HopFailed) as err:
            send(servers[0][0].address, x, y, budget=1.0, max_attempts=1)
        assert slow.entered.is_set() and not slow.finished.is_set(), "the caller waited for the slow stage"
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert send(servers[0][0].address, x, y, budget=30).result.loss > 0
        assert servers[0][0].runtime.pending_backward == 0


def test_graceful_stop_finishes_in_flight_work_then_refuses():
    stages = fresh_stages("tiny", V, T, 1)
    slow = Delayed(stages[0], 1.0)
    slow.config = stages[0].config
    with stage_chain([slow], V) as servers:
        server = servers[0][0]
        x, y = tokens(V, B, T)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("out", send(server.address, x, y)))
        t.start()
        wait_until(slow.entered.is_set, timeout=30, what="the hop inside its (slow) forward")
        assert server.stop(grace=10) is True
        t.join(10)
        assert box["out"].result.loss > 0
        with pytest.raises(HopFailed) as err:
            send(server.address, x, y, max_attempts=1, budget=5)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_health_and_info():
    stages = fresh_stages("tiny", V, T, 2)
    with stage_chain(stages, V) as servers:
        address = servers[1][0].address
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="swarm.v1.Stage"), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            info = channel.unary_unary("/swarm.v1.Stage/Info", request_serializer=pb.InfoRequest.SerializeToString,
                                       response_deserializer=pb.InfoReply.FromString)(pb.InfoRequest(), timeout=5)
    assert (info.stage, info.num_stages, info.hidden_size, info.vocab_size, info.state) == (1, 2, 64, V, "serving")



class _NanInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class NanInputGrad(torch.nn.Module):
    """A last stage whose loss is fine but whose gradient at its input is NaN (a broken peer)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, x):
        return self.inner(_NanInputGrad.apply(x))


def test_a_nan_gradient_from_the_next_stage_is_refused_and_nothing_is_accumulated():
    stages = fresh_stages("tiny", V, T, 2)
    with stage_chain([stages[0], NanInputGrad(stages[1])], V) as servers:
        x, y = tokens(V, B, T)
        with pytest.raises(HopFailed) as err:
            send(servers[0][0].address, x, y, max_attempts=1)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "returned a bad gradient (it contains NaN or inf)" in str(err.value), str(err.value)
        assert servers[0][0].runtime.pending_backward == 0 and not grads_of([stages[0]])


def test_a_last_stage_whose_loss_is_nan_refuses_the_microbatch_and_accumulates_nothing():
    """A replica whose parameters went NaN: its NaN gradients would spoil its whole epoch's accumulation."""
    stages = fresh_stages("tiny", V, T, 2)
    with torch.no_grad():
        next(stages[1].parameters()).fill_(float("nan"))
    with stage_chain(stages, V) as servers:
        x, y = tokens(V, B, T)
        with pytest.raises(HopFailed) as err:
            send(servers[0][0].address, x, y, max_attempts=1)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "stage 1: loss is nan: not back-propagated" in str(err.value), str(err.value)
        last = servers[1][0].runtime
        assert last.samples_accumulated == 0 and last.pending_backward == 0
        assert not grads_of([stages[0]]) and not grads_of([stages[1]])
