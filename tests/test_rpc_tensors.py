"""Tensors <-> chunked messages: every dtype and codec, chunk boundaries, and malformed chunks."""

import grpc
import pytest
import torch

from peer.rpc import codecs
from peer.rpc.tensors import Assembler, WireError, decode_all, pack, tensor_chunks

# relative error bound of each codec on normally distributed values
TOLERANCE = {"none": 0.0, "fp16": 1e-3, "bf16": 8e-3, "int8": 2e-2}


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_round_trip_per_codec(codec, dtype):
    x = torch.randn(4, 33, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    chunks = tensor_chunks("hidden", x, codec, chunk_bytes=10_000)
    y = decode_all(chunks, ["hidden"], 1 << 30)["hidden"]
    assert y.dtype == dtype and y.shape == x.shape
    if codec == "none":
        assert torch.equal(y, x)
    else:
        rel = ((y.float() - x.float()).norm() / x.float().norm()).item()
        assert rel <= TOLERANCE[codec] + (4e-3 if dtype != torch.float32 else 0), rel
    wire = sum(len(c.data) for c in chunks)
    assert wire == codecs.encoded_size(x.numel(), dtype, codec)
    if codec == "int8":
        assert wire < x.numel() * 1.1


def test_int64_always_exact_and_ignores_codec():
    ids = torch.randint(-2**40, 2**40, (3, 17))
    for codec in codecs.CODECS:
        chunks = tensor_chunks("labels", ids, codec)
        assert all(c.meta.codec == 0 for c in chunks)
        assert torch.equal(decode_all(chunks, ["labels"], 1 << 20)["labels"], ids)


@pytest.mark.parametrize("numel", [0, 1, 255, 256, 257, 1023, 1024, 1025, 4096])
def test_chunk_boundaries(numel):
    x = torch.arange(numel, dtype=torch.float32)
    chunk_bytes = 1024  # 256 float32 per chunk
    chunks = tensor_chunks("hidden", x, "none", chunk_bytes)
    assert len(chunks) == max(1, -(-numel * 4 // chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert torch.equal(decode_all(chunks, ["hidden"], 1 << 20)["hidden"], x)
    int8 = decode_all(tensor_chunks("hidden", x, "int8", chunk_bytes), ["hidden"], 1 << 20)["hidden"]
    assert int8.shape == x.shape


def test_fp16_keeps_tiny_gradients():
    g = torch.randn(1000) * 1e-7  # below float16's normal range without the scale
    y = decode_all(tensor_chunks("grad", g, "fp16"), ["grad"], 1 << 20)["grad"]
    assert ((y - g).norm() / g.norm()).item() < 1e-3


def test_nan_and_inf_survive_every_codec():
    x = torch.randn(600)
    x[3], x[400] = float("nan"), float("inf")
    for codec in codecs.CODECS:
        y = decode_all(tensor_chunks("hidden", x, codec), ["hidden"], 1 << 20)["hidden"]
        assert not torch.isfinite(y.sum(dtype=torch.float64)), codec


def test_scalar_and_zero_blocks():
    for x in (torch.tensor(3.5), torch.zeros(300)):
        for codec in codecs.CODECS:
            y = decode_all(tensor_chunks("hidden", x, codec), ["hidden"], 1 << 20)["hidden"]
            assert y.shape == x.shape and torch.allclose(y, x, rtol=1e-2)


def test_pack_groups_small_chunks_and_splits_big_ones():
    small = (tensor_chunks("labels", torch.zeros(2, 8, dtype=torch.int64))
             + tensor_chunks("hidden", torch.zeros(2, 8, 4)))
    assert len(list(pack(small, 1 << 20))) == 1
    big = tensor_chunks("hidden", torch.zeros(3 << 18), "none", 1 << 20)  # 3 MiB
    groups = list(pack(big, 1 << 20))
    assert len(groups) == 3 and all(len(g) == 1 for g in groups)
    labels = tensor_chunks("labels", torch.zeros(8, 128, dtype=torch.int64))  # 8 KiB rides with the last chunk
    assert [len(g) for g in pack(big + labels, 1 << 20)] == [1, 1, 2]


def _chunks(n=3):
    return tensor_chunks("hidden", torch.randn(n * 256), "none", 1024)


def test_assembler_rejects_bad_streams():
    chunks = _chunks()
    with pytest.raises(WireError, match="truncated stream: missing hidden \\(2 of 3 chunks\\)"):
        decode_all(chunks[:2], ["hidden"], 1 << 20)
    with pytest.raises(WireError, match="expected chunk 1, got chunk 2"):
        decode_all([chunks[0], chunks[2]], ["hidden"], 1 << 20)
    with pytest.raises(WireError, match="unexpected tensor 'hidden'"):
        decode_all(chunks, ["labels"], 1 << 20)
    bad = _chunks()
    bad[1].meta.shape[:] = [5]
    with pytest.raises(WireError, match="disagrees with chunk 0"):
        decode_all(bad, ["hidden"], 1 << 20)
    lying = _chunks(1)
    lying[0].meta.total_bytes = 999
    with pytest.raises(WireError, match="declares 999 bytes"):
        decode_all(lying, ["hidden"], 1 << 20)
    short = _chunks(1)
    short[0].data = short[0].data[:-4]
    with pytest.raises(WireError, match="carried 1020 bytes, 1024 declared"):
        decode_all(short, ["hidden"], 1 << 20)
    with pytest.raises(WireError) as err:
        decode_all(_chunks(), ["hidden"], 1000)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    huge = _chunks(1)
    huge[0].meta.shape[:] = [1 << 40]
    huge[0].meta.total_bytes = 4 << 40
    with pytest.raises(WireError) as err:
        Assembler(["hidden"], 1 << 20).add(huge[0])
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unsupported_dtype_is_refused_on_send():
    with pytest.raises(TypeError, match="cannot be sent"):
        tensor_chunks("x", torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown codec"):
        tensor_chunks("x", torch.zeros(3), "zstd")
