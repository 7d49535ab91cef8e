"""A raw gRPC client (generic calls, bytes built by hand) sends bad requests: each gets the
documented status and message, and the server keeps serving valid requests afterwards."""

import math

import grpc
import pytest
import torch

from peer.rpc import stage_pb2 as pb
from stage_helpers import RUN, fresh_stages, send, stage_chain, tokens

V, T, B, H = 512, 16, 2, 64
HOP = "/swarm.v1.Stage/Hop"


@pytest.fixture(scope="module")
def servers():
    with stage_chain(fresh_stages("tiny", V, T, 2), V, server_kwargs={1: {"max_payload_bytes": 1 << 20}}) as s:
        yield s


def raw_hop(address, messages: list[bytes], timeout=10):
    """Send raw bytes on the Hop method; return (status code, details)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(HOP)  # no serializers: bytes in, bytes out
        try:
            replies = list(call(iter(messages), timeout=timeout))
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, replies


def header(stage=1, run=RUN):
    return pb.MicrobatchHeader(run_id=run, microbatch_id="raw", stage=stage, budget_s=10)


def tensor(name, t: torch.Tensor, dtype=None, shape=None, **over):
    data = t.contiguous().view(torch.uint8).numpy().tobytes()
    msg = pb.Tensor(name=name, dtype=dtype or {torch.float32: pb.FLOAT32, torch.int64: pb.INT64}[t.dtype],
                    shape=list(shape or t.shape), total_bytes=len(data), chunk_index=0, chunk_count=1, data=data)
    for k, v in over.items():
        setattr(msg, k, v)
    return msg


def request(*tensors, hdr=None):
    return pb.HopRequest(header=hdr or header(), tensors=list(tensors)).SerializeToString()


HIDDEN = torch.randn(B, T, H)
LABELS = torch.randint(0, V, (B, T))


def cases():
    nan = HIDDEN.clone()
    nan[0, 0, 0] = math.nan
    inf = HIDDEN.clone()
    inf[1, 2, 3] = math.inf
    big = torch.zeros(B, T, H)
    chunks = [tensor("hidden", HIDDEN)]
    two = HIDDEN.contiguous().view(torch.uint8).numpy().tobytes()
    half = len(two) // 2
    first_half = pb.Tensor(name="hidden", dtype=pb.FLOAT32, shape=[B, T, H], total_bytes=len(two), chunk_index=0,
                           chunk_count=2, data=two[:half])
    yield "garbage bytes", [b"\xff\x00garbage\x12\x99"], grpc.StatusCode.INVALID_ARGUMENT, "malformed"
    yield "no header", [pb.HopRequest(tensors=chunks).SerializeToString()], grpc.StatusCode.INVALID_ARGUMENT, \
        "must carry the header"
    yield "wrong run", [request(*chunks, tensor("labels", LABELS), hdr=header(run="other"))], \
        grpc.StatusCode.FAILED_PRECONDITION, "run 'other'"
    yield "wrong stage", [request(*chunks, tensor("labels", LABELS), hdr=header(stage=0))], \
        grpc.StatusCode.FAILED_PRECONDITION, "stage 0"
    yield "wrong hidden size", [request(tensor("hidden", torch.randn(B, T, H + 1)), tensor("labels", LABELS))], \
        grpc.StatusCode.INVALID_ARGUMENT, f"hidden must be float [{B}, {T}, {H}]"
    yield "labels as float", [request(*chunks, tensor("labels", LABELS.float()))], \
        grpc.StatusCode.INVALID_ARGUMENT, "labels must be int64"
    yield "labels out of range", [request(*chunks, tensor("labels", LABELS + V))], \
        grpc.StatusCode.INVALID_ARGUMENT, "labels out of range"
    yield "NaN", [request(tensor("hidden", nan), tensor("labels", LABELS))], grpc.StatusCode.INVALID_ARGUMENT, "NaN"
    yield "inf", [request(tensor("hidden", inf), tensor("labels", LABELS))], grpc.StatusCode.INVALID_ARGUMENT, \
        "NaN or inf"
    yield "oversized", [request(tensor("hidden", big, shape=[B * 512, T, H], total_bytes=B * 512 * T * H * 4))], \
        grpc.StatusCode.RESOURCE_EXHAUSTED, "payload too large"
    yield "truncated", [request(first_half, tensor("labels", LABELS))], grpc.StatusCode.INVALID_ARGUMENT, \
        "truncated stream: missing hidden (1 of 2 chunks)"
    yield "unknown tensor", [request(tensor("weights", HIDDEN))], grpc.StatusCode.INVALID_ARGUMENT, "unexpected tensor"
    yield "lying size", [request(tensor("hidden", HIDDEN, total_bytes=12), tensor("labels", LABELS))], \
        grpc.StatusCode.INVALID_ARGUMENT, "declares 12 bytes"
    yield "empty stream", [], grpc.StatusCode.INVALID_ARGUMENT, "empty request stream"


@pytest.mark.parametrize("name,messages,code,fragment", list(cases()), ids=[c[0] for c in cases()])
def test_bad_requests_get_documented_status_then_a_valid_one_succeeds(servers, name, messages, code, fragment):
    address = servers[1][0].address
    got, details = raw_hop(address, messages)
    assert got == code, (name, got, details)
    assert fragment in details, details
    ok, replies = raw_hop(address, [request(tensor("hidden", HIDDEN), tensor("labels", LABELS))])
    assert ok == grpc.StatusCode.OK
    reply = pb.HopReply.FromString(replies[-1])
    assert reply.result.loss > 0 and reply.result.samples == B


def test_first_stage_checks_token_ids(servers):
    address = servers[0][0].address
    bad = torch.full((B, T), V, dtype=torch.int64)
    code, details = raw_hop(address, [request(tensor("input_ids", bad), tensor("labels", LABELS), hdr=header(0))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input_ids out of range" in details
    code, details = raw_hop(address, [request(tensor("input_ids", torch.zeros(B, T + 1, dtype=torch.int64)),
                                              tensor("labels", LABELS), hdr=header(0))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input_ids must be int64" in details
    x, y = tokens(V, B, T)
    assert send(address, x, y).result.loss > 0


def test_garbage_info_request(servers):
    with grpc.insecure_channel(servers[0][0].address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/swarm.v1.Stage/Info")(b"\xff\xff\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
