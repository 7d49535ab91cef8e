"""Faults with real processes: a next-stage peer SIGKILLed mid-request is retried on another replica
with an exact result; with every replica gone the error reaches the caller quickly and clearly."""

import asyncio
import threading
import time

import grpc
import pytest

from peer.rpc.client import HopFailed
from peer.rpc.client import StaticNextHop
from peer.stage.runtime import StageRuntime, StageSpec
from peer.stage.server import StageServer
from stage_helpers import RUN, StageProcess, fresh_stages, grads_of, max_diff, reference_grads, send, tokens

pytestmark = pytest.mark.slow
V, T, B = 512, 32, 4
LAUNCH = ["--preset", "llama-14m", "--vocab-size", str(V), "--seq-len", str(T), "--stage", "1",
          "--num-stages", "2", "--run-id", RUN, "--threads", "1"]


def first_stage(next_addresses):
    stage0 = fresh_stages("llama-14m", V, T, 2)[0]
    spec = StageSpec(RUN, 0, 2, 128, V, max_seq_len=T)
    server = StageServer(StageRuntime(stage0, spec), StaticNextHop(next_addresses, shuffle=False)).start()
    return stage0, server


def test_next_stage_killed_mid_request_is_retried_on_another_replica_exactly():
    x, y = tokens(V, B, T, seed=3)
    ref_loss, ref_grads = reference_grads("llama-14m", V, T, x, y)
    with StageProcess(*LAUNCH, "--delay", "3") as doomed, StageProcess(*LAUNCH) as healthy:
        stage0, server = first_stage([doomed.address, healthy.address])
        try:
            box = {}
            hop = threading.Thread(target=lambda: box.setdefault("outcome", send(server.address, x, y, budget=60)))
            hop.start()
            doomed.wait_for_line("FORWARD", timeout=30)  # the doomed replica is inside its forward now
            assert doomed.proc.poll() is None
            doomed.kill()  # SIGKILL
            hop.join(60)
            outcome = box["outcome"]
            assert outcome.result.loss == pytest.approx(ref_loss, abs=1e-6)
            assert outcome.result.timings[0].retries == 1
            assert outcome.result.timings[1].peer.endswith(healthy.address.split(":")[1])
            assert max_diff(grads_of([stage0]), ref_grads) <= 1e-6
            assert server.servicer.counters["retries"] == 1
            assert server.runtime.pending_backward == 0
        finally:
            server.stop(grace=2)


def test_all_replicas_down_gives_a_clear_error_quickly():
    with StageProcess(*LAUNCH) as a, StageProcess(*LAUNCH) as b:
        addresses = [a.address, b.address]
        a.kill()
        b.kill()
    stage0, server = first_stage(addresses)
    release = server.runtime.release

    async def slow_release(act=None):  # the microbatch must be released before the caller hears of the failure
        await asyncio.sleep(0.5)
        await release(act)

    server.runtime.release = slow_release
    try:
        x, y = tokens(V, B, T)
        t0 = time.perf_counter()
        with pytest.raises(HopFailed) as err:
            send(server.address, x, y, budget=30, max_attempts=1)
        assert time.perf_counter() - t0 < 15
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        message = str(err.value)
        assert "stage 1" in message and "hop failed after 2 attempt(s)" in message, message
        assert server.runtime.pending_backward == 0 and not grads_of([stage0])
        assert server.servicer.counters["downstream_failures"] == 2
    finally:
        server.stop(grace=2)
