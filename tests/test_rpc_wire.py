"""Hop message framing (peer.rpc.wire): the hand framing is plain protobuf both ways, on both sides
of the small-message threshold, and received tensors are used in place when they can be."""

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from peer.rpc import stage_pb2 as pb
from peer.rpc import wire
from peer.rpc.tensors import decode_all, tensor_chunks
from peer.rpc.tensors import all_finite

HEADER = pb.MicrobatchHeader(run_id="r", microbatch_id="m1", stage=1, budget_s=5.0)
# below, at and above the threshold; the large ones go through the hand framing
SIZES = [16, wire.SMALL_MESSAGE // 4 - 2048, wire.SMALL_MESSAGE // 4 + 1, 600_000]


def _chunks(numel: int):
    hidden = torch.randn(numel)
    labels = torch.arange(7, dtype=torch.int64)
    return hidden, labels, tensor_chunks("hidden", hidden) + tensor_chunks("labels", labels)


@pytest.mark.parametrize("numel", SIZES)
def test_request_round_trip_and_protobuf_agrees(numel):
    hidden, labels, chunks = _chunks(numel)
    raw = wire.encode_request(HEADER, chunks)
    header, parsed = wire.parse_request(raw)
    assert header == HEADER
    got = decode_all(parsed, ["hidden", "labels"], 1 << 30)
    assert torch.equal(got["hidden"], hidden) and torch.equal(got["labels"], labels)
    # the protobuf runtime reads what we framed by hand ...
    message = pb.HopRequest.FromString(raw)
    assert message.header == HEADER and {t.name for t in message.tensors} == {"hidden", "labels"}
    assert b"".join(t.data for t in message.tensors if t.name == "hidden") == hidden.numpy().tobytes()
    # ... and we read what it writes, whatever the size
    header2, parsed2 = wire.parse_request(message.SerializeToString())
    assert header2 == HEADER
    assert torch.equal(decode_all(parsed2, ["hidden", "labels"], 1 << 30)["hidden"], hidden)


@pytest.mark.parametrize("numel", SIZES)
def test_reply_round_trip(numel):
    grad = torch.randn(numel)
    result = pb.HopResult(loss=1.5, samples=3, timings=[pb.HopTiming(stage=1, peer="p", forward_s=0.01)])
    raw = wire.encode_reply(tensor_chunks("grad", grad), result)
    chunks, got_result = wire.parse_reply(raw)
    assert got_result == result
    assert torch.equal(decode_all(chunks, ["grad"], 1 << 30)["grad"], grad)
    assert pb.HopReply.FromString(raw).result == result
    empty_chunks, no_result = wire.parse_reply(wire.encode_reply([], None))
    assert empty_chunks == [] and no_result is None


def test_large_single_chunk_is_used_in_place():
    hidden = torch.randn(200_000)  # 800 KB: hand framing, one chunk, data aligned by the pad field
    raw = wire.encode_request(HEADER, tensor_chunks("hidden", hidden))
    _, chunks = wire.parse_request(raw)
    got = decode_all(chunks, ["hidden"], 1 << 30)["hidden"]
    start = np.frombuffer(raw, dtype=np.uint8).ctypes.data
    assert start <= got.data_ptr() < start + len(raw)  # a view into the received message, no copy
    assert got.data_ptr() % 8 == 0 and torch.equal(got, hidden)


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x12\x05ab", b"\x12" + bytes(300_000)])
def test_malformed_bytes_raise_decode_error(raw):
    with pytest.raises(DecodeError):
        wire.parse_request(raw)
    with pytest.raises(DecodeError):
        wire.parse_reply(raw)


def test_all_finite():
    assert all_finite(torch.randn(1000))
    big = torch.full((16,), 3e38)  # finite, but the float32 sum overflows: checked element by element
    assert all_finite(big)
    assert all_finite(torch.full((100,), 60000.0, dtype=torch.float16))  # half sum overflows too
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(1000)
        x[17] = bad
        assert not all_finite(x)
        assert not all_finite(x.to(torch.bfloat16))
