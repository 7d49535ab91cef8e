"""A stage's data plane under strangers' load: idle calls hold no microbatch slot and are cut off after the header
deadline, one address cannot open more than its share of calls, a header declaring a huge tensor is refused before
anything is allocated, buffers grow only as chunks arrive, and a call cannot ask for more time than the peer
allows. Real gRPC servers on 127.0.0.1 (in-process stages); real hops are timed while the strangers' calls are open.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from peer.rpc import stage_pb2 as pb
from peer.rpc.client import StageClient, StaticNextHop, hop_with_retries, request_messages
from peer.rpc.tensors import CHUNK_BYTES, Assembler, Chunk
from peer.stage import servicer as servicer_module
from stage_helpers import fresh_stages, run_async, stage_chain, tokens

V, T, B, H = 512, 16, 2, 64
HOP = "/swarm.v1.Stage/Hop"


@pytest.fixture(scope="module")
def servers():
    # stage 0: a small in-flight limit (20 idle calls are more than it, and would starve it if they held slots);
    # stage 1: the default (16), above the per-address limit the test sets
    with stage_chain(fresh_stages("tiny", V, T, 2), V, server_kwargs={0: {"max_in_flight": 4}}) as s:
        yield s


def _vm_rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _real_hop(address: str) -> float:
    """Seconds one valid microbatch takes through both stages."""
    client = StageClient()
    x, y = tokens(V, B, T)
    header = pb.MicrobatchHeader(run_id="test-run", microbatch_id="real", trainer_id="t", stage=0, budget_s=30)
    t0 = time.perf_counter()
    try:
        outcome = await hop_with_retries(client, StaticNextHop([address]), request_messages(header, {
            "input_ids": x, "labels": y}, "none"), [], time.monotonic() + 30, max_attempts=1)
        assert outcome.result.loss > 0
    finally:
        await client.close()
    return time.perf_counter() - t0


class IdleCalls:
    """``count`` Hop calls to ``address`` that send nothing until closed."""

    def __init__(self, address: str, count: int):
        self.channel = grpc.aio.insecure_channel(address)
        self.release = asyncio.Event()
        self.calls = [self.channel.stream_stream(HOP)(self._nothing(), timeout=60) for _ in range(count)]

    async def _nothing(self):
        await self.release.wait()
        return
        yield  # an async generator that ends without sending

    async def close(self) -> None:
        self.release.set()
        await asyncio.sleep(0.1)  # let the request iterators end
        await self.channel.close()


async def _status(call) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_idle_calls_hold_no_slot_and_are_cut_off(servers, monkeypatch):
    monkeypatch.setattr(servicer_module, "HEADER_TIMEOUT_S", 2.0)
    address = servers[0][0].address

    async def go():
        baseline = await _real_hop(address)
        idle = IdleCalls(address, 20)
        try:
            took = await _real_hop(address)  # 20 idle calls open against 4 slots
            codes = await asyncio.wait_for(asyncio.gather(*(_status(c) for c in idle.calls)), 20)
        finally:
            await idle.close()
        return baseline, took, codes

    baseline, took, codes = run_async(go())
    assert took < baseline + 5.0, (baseline, took)
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes  # cut off at the header deadline
    assert servers[0][0].servicer.in_flight == 0


def test_one_address_cannot_open_more_than_its_share(servers, monkeypatch):
    monkeypatch.setattr(servicer_module, "MAX_STREAMS_PER_CALLER", 5)
    monkeypatch.setattr(servicer_module, "HEADER_TIMEOUT_S", 3.0)
    address = servers[1][0].address

    async def go():
        idle = IdleCalls(address, 6)
        try:
            return await asyncio.wait_for(asyncio.gather(*(_status(c) for c in idle.calls)), 20)
        finally:
            await idle.close()

    codes = run_async(go())
    assert sorted(codes, key=str).count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes, codes


def test_a_header_declaring_a_huge_tensor_is_refused_before_anything_is_allocated(servers):
    address = servers[1][0].address
    huge = pb.Tensor(name="hidden", dtype=pb.FLOAT32, shape=[1 << 14, 1 << 14], total_bytes=1 << 30,
                     chunk_index=0, chunk_count=1024, data=b"\0" * 1024)
    message = pb.HopRequest(header=pb.MicrobatchHeader(run_id="test-run", microbatch_id="x", stage=1, budget_s=5),
                            tensors=[huge]).SerializeToString()
    before = _vm_rss_kib()
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(channel.stream_stream(HOP)(iter([message]), timeout=10))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "payload too large" in refused.value.details()
    assert _vm_rss_kib() - before < 64 * 1024  # far from the 1 GiB declared
    limit = servers[1][0].servicer.max_payload_bytes
    assert limit == servicer_module.input_bytes(servers[1][0].runtime.spec) and limit < 1 << 30


def test_buffers_grow_as_chunks_arrive():
    total = 64 << 20  # declared: 64 MiB in 32 chunks
    first = pb.Tensor(name="hidden", dtype=pb.FLOAT32, shape=[total // 4], total_bytes=total, chunk_index=0,
                      chunk_count=total // CHUNK_BYTES)
    assembler = Assembler(["hidden"], 1 << 30)
    assembler.add(Chunk(first, b"\1" * CHUNK_BYTES))
    assert len(assembler.partial["hidden"].buffer) <= 2 * CHUNK_BYTES  # not the 64 MiB declared
    for i in range(1, first.chunk_count):
        meta = pb.Tensor()
        meta.CopyFrom(first)
        meta.chunk_index = i
        assembler.add(Chunk(meta, bytes([i % 256]) * CHUNK_BYTES))
    got = assembler.done["hidden"].view(torch.uint8)
    assert got.numel() == total and int(got[0]) == 1 and int(got[-1]) == (first.chunk_count - 1) % 256


def test_a_call_cannot_ask_for_more_time_than_the_peer_allows(servers):
    servicer = servers[0][0].servicer

    class Context:
        @staticmethod
        def time_remaining():
            return None  # the caller set no gRPC deadline

    greedy = pb.MicrobatchHeader(budget_s=1e9)
    assert servicer._deadline(greedy, Context()) - time.monotonic() <= servicer.max_budget_s
    modest = pb.MicrobatchHeader(budget_s=3.0)
    assert servicer._deadline(modest, Context()) - time.monotonic() <= 3.0


def test_a_client_keeps_a_bounded_number_of_channels(monkeypatch):
    from peer.rpc import client as client_module

    monkeypatch.setattr(client_module, "MAX_CHANNELS", 2)

    async def go():
        client = StageClient()
        for port in (1001, 1002, 1003, 1002, 1004):  # addresses from records: no call is made
            client.stub(f"127.0.0.1:{port}")
        kept = list(client._stubs)
        await client.close()
        return kept

    assert run_async(go()) == ["127.0.0.1:1002", "127.0.0.1:1004"]  # the least recently used went first


def test_before_hidden_states_the_header_travels_alone_and_the_hop_is_served(servers):
    from peer.rpc import wire
    from stage_helpers import send

    hidden, labels = torch.randn(8, T, H), torch.randint(0, V, (8, T))
    header = pb.MicrobatchHeader(run_id="test-run", microbatch_id="big", stage=1, budget_s=30)
    small = request_messages(header, {"hidden": hidden[:1, :2], "labels": labels[:1, :2]}, "none")
    assert len(small) == 1  # a small request: one message, the header with the chunks
    big = torch.randn(64, T, H)  # 256 KiB of hidden states
    messages = request_messages(header, {"hidden": big, "labels": torch.randint(0, V, (64, T))}, "none")
    first_header, first_chunks = wire.parse_request(messages[0])
    assert first_header.microbatch_id == "big" and first_chunks == []
    outcome = send(servers[1][0].address, big, torch.randint(0, V, (64, T)), stage=1)
    assert outcome.result.loss > 0 and outcome.result.samples == 64
