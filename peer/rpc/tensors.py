"""torch tensors <-> chunks of ``swarm.v1.Tensor``, with checks on the way in.

Sending: :func:`tensor_chunks` encodes a tensor with a codec and slices the payload into
chunks of at most ``chunk_bytes`` (memoryviews of the encoded bytes, no copy);
:func:`pack` groups chunks (of one or several tensors) into messages of about
``chunk_bytes`` each, so a small microbatch is one message (see :mod:`peer.rpc.wire`).

Receiving: :class:`Assembler` takes chunks in any interleaving of tensors (in order per
tensor), checks that their metadata agree and that the total stays under a byte limit,
and decodes each tensor once its last chunk has arrived. Every problem raises
:class:`WireError` carrying the gRPC status the server answers with.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Iterator

import grpc
import torch

from peer.rpc import codecs
from peer.rpc import stage_pb2 as pb
from peer.rpc.wire import Chunk

CHUNK_BYTES = 1 << 20  # 1 MiB of payload per chunk
PACK_SLACK = 64 << 10  # a message may exceed CHUNK_BYTES by this much to carry small chunks along
DTYPE_TO_PB = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16, torch.int64: pb.INT64}
PB_TO_DTYPE = {v: k for k, v in DTYPE_TO_PB.items()}
CODEC_TO_PB = {"none": pb.CODEC_NONE, "fp16": pb.CODEC_FP16, "bf16": pb.CODEC_BF16, "int8": pb.CODEC_INT8}
PB_TO_CODEC = {v: k for k, v in CODEC_TO_PB.items()}
MAX_DIMS = 8
# Received tensors view the (immutable) message bytes; nothing writes into them, so torch's
# "buffer is not writable" warning says nothing here. Filtered once rather than per tensor.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=r"peer\.rpc\.tensors")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``. One reduction in the tensor's own dtype (NaN and inf propagate through
    a sum); only when that sum is not finite, which finite values can also cause by overflowing, is
    every element checked."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


class WireError(Exception):
    """A malformed, inconsistent or oversized message; ``code`` is the gRPC status to answer with."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(message)
        self.code = code


def tensor_chunks(name: str, tensor: torch.Tensor, codec: str = "none",
                  chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Encode ``tensor`` and cut it into chunk messages (at least one, even for an empty tensor)."""
    if tensor.dtype not in DTYPE_TO_PB:
        raise TypeError(f"{name}: dtype {tensor.dtype} cannot be sent; use float32/float16/bfloat16/int64")
    if codec not in CODEC_TO_PB:
        raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(codecs.CODECS)}")
    if not tensor.dtype.is_floating_point:
        codec = "none"
    payload = memoryview(codecs.encode(tensor, codec).numpy())  # flat bytes, no copy for codec none
    total = payload.nbytes
    count = max(1, math.ceil(total / chunk_bytes))
    meta = dict(name=name, dtype=DTYPE_TO_PB[tensor.dtype], shape=list(tensor.shape), codec=CODEC_TO_PB[codec],
                block_size=codecs.INT8_BLOCK if codec == "int8" else 0, total_bytes=total, chunk_count=count)
    return [Chunk(pb.Tensor(chunk_index=i, **meta), payload[i * chunk_bytes : (i + 1) * chunk_bytes])
            for i in range(count)]


def pack(chunks: Iterable[Chunk], chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[Chunk]]:
    """Group chunks into lists of about ``chunk_bytes`` of payload each (never empty); a small chunk
    (labels, a tail) rides along with a full one rather than costing a message of its own."""
    group, size = [], 0
    for chunk in chunks:
        if group and size + len(chunk.data) > chunk_bytes + PACK_SLACK:
            yield group
            group, size = [], 0
        group.append(chunk)
        size += len(chunk.data)
    if group:
        yield group


class _Partial:
    """A tensor being received: a single chunk is used in place (if aligned); several chunks are copied into a
    buffer that grows (doubling, up to the declared size) as they arrive, so that a small chunk declaring a
    large tensor allocates little."""

    def __init__(self, first: pb.Tensor):
        self.first = first
        self.buffer = bytearray() if first.chunk_count > 1 else None
        self.single: memoryview | bytes = b""
        self.chunks = 0
        self.received = 0

    def write(self, data) -> None:
        end = self.received + len(data)
        if end > len(self.buffer):
            grown = bytearray(min(self.first.total_bytes, max(end, 2 * len(self.buffer))))
            grown[: self.received] = memoryview(self.buffer)[: self.received]
            self.buffer = grown
        self.buffer[self.received : end] = data


def _metadata(chunk: pb.Tensor) -> tuple:
    """What every chunk of a tensor must repeat from its chunk 0."""
    return chunk.dtype, list(chunk.shape), chunk.codec, chunk.block_size, chunk.total_bytes, chunk.chunk_count


def _payload(partial: _Partial) -> torch.Tensor:
    """The received bytes as a flat uint8 tensor, sharing the message's memory when possible.

    A single chunk whose bytes are 8-byte aligned (our senders align them) is used in place:
    it lives in the received message, which nothing else holds. Otherwise it is copied.
    """
    if partial.buffer is not None:
        return torch.frombuffer(partial.buffer, dtype=torch.uint8)
    payload = torch.frombuffer(partial.single, dtype=torch.uint8)  # read-only: never written in place
    return payload if payload.data_ptr() % 8 == 0 else payload.clone()


class Assembler:
    """Reassembles tensors from chunks; at most ``max_bytes`` of payload in all.

    :param expected: names of the tensors that must arrive (others are refused)
    """

    def __init__(self, expected: Iterable[str], max_bytes: int):
        self.expected = set(expected)
        self.max_bytes = max_bytes
        self.declared = 0
        self.partial: dict[str, _Partial] = {}
        self.done: dict[str, torch.Tensor] = {}

    def add(self, piece: Chunk) -> None:
        chunk, data = piece.meta, piece.data
        name = chunk.name
        if name not in self.expected:
            raise WireError(f"unexpected tensor {name!r}; this call takes {', '.join(sorted(self.expected))}")
        if name in self.done:
            raise WireError(f"tensor {name!r} was already complete; got another chunk")
        partial = self.partial.get(name)
        if partial is None:
            self._check_header(chunk)
            partial = self.partial[name] = _Partial(chunk)
        first = partial.first
        if chunk is not first and _metadata(chunk) != _metadata(first):
            raise WireError(f"tensor {name!r}: chunk {chunk.chunk_index} disagrees with chunk 0 on its metadata")
        if chunk.chunk_index != partial.chunks:
            raise WireError(f"tensor {name!r}: expected chunk {partial.chunks}, got chunk {chunk.chunk_index}")
        if partial.received + len(data) > first.total_bytes:
            raise WireError(f"tensor {name!r}: chunks carry more than the declared {first.total_bytes} bytes")
        if partial.buffer is None:
            partial.single = data
        else:
            partial.write(data)
        partial.received += len(data)
        partial.chunks += 1
        if partial.chunks == first.chunk_count:
            self.done[name] = self._decode(partial)
            del self.partial[name]

    def _check_header(self, chunk: pb.Tensor) -> None:
        name = chunk.name
        if chunk.dtype not in PB_TO_DTYPE:
            raise WireError(f"tensor {name!r}: unknown dtype {chunk.dtype}")
        if chunk.codec not in PB_TO_CODEC:
            raise WireError(f"tensor {name!r}: unknown codec {chunk.codec}")
        if len(chunk.shape) > MAX_DIMS or any(d < 0 for d in chunk.shape):
            raise WireError(f"tensor {name!r}: invalid shape {list(chunk.shape)}")
        if chunk.chunk_count < 1 or chunk.chunk_count > max(1, chunk.total_bytes):
            raise WireError(f"tensor {name!r}: invalid chunk count {chunk.chunk_count}")
        codec, dtype = PB_TO_CODEC[chunk.codec], PB_TO_DTYPE[chunk.dtype]
        if codec == "int8" and chunk.block_size < 1:
            raise WireError(f"tensor {name!r}: int8 codec needs a positive block size")
        if codec != "none" and not dtype.is_floating_point:
            raise WireError(f"tensor {name!r}: codec {codec} applies to float tensors only")
        needed = codecs.encoded_size(math.prod(chunk.shape), dtype, codec, chunk.block_size or codecs.INT8_BLOCK)
        if chunk.total_bytes != needed:
            raise WireError(f"tensor {name!r}: declares {chunk.total_bytes} bytes, {codec} {dtype} "
                            f"{list(chunk.shape)} needs {needed}")
        self.declared += chunk.total_bytes
        if self.declared > self.max_bytes:
            raise WireError(f"payload too large: {self.declared} bytes declared, the limit is {self.max_bytes}",
                            grpc.StatusCode.RESOURCE_EXHAUSTED)

    def _decode(self, partial: _Partial) -> torch.Tensor:
        first = partial.first
        if partial.received != first.total_bytes:
            raise WireError(f"tensor {first.name!r}: {first.chunk_count} chunks carried {partial.received} bytes, "
                            f"{first.total_bytes} declared")
        payload = _payload(partial) if first.total_bytes else torch.empty(0, dtype=torch.uint8)
        try:
            return codecs.decode(payload, PB_TO_DTYPE[first.dtype], tuple(first.shape), PB_TO_CODEC[first.codec],
                                 first.block_size or codecs.INT8_BLOCK)
        except (ValueError, RuntimeError) as e:
            raise WireError(f"tensor {first.name!r}: cannot decode: {e}") from None

    def missing(self) -> list[str]:
        """Descriptions of what has not fully arrived, e.g. ``["hidden (3 of 5 chunks)", "labels"]``."""
        out = []
        for name in sorted(self.expected - set(self.done)):
            p = self.partial.get(name)
            out.append(f"{name} ({p.chunks} of {p.first.chunk_count} chunks)" if p else name)
        return out

    def complete(self) -> bool:
        return set(self.done) == self.expected


def decode_all(chunks: Iterable[Chunk], expected: Iterable[str], max_bytes: int) -> dict[str, torch.Tensor]:
    """Assemble a complete set of tensors from chunks, or raise :class:`WireError`."""
    assembler = Assembler(expected, max_bytes)
    for chunk in chunks:
        assembler.add(chunk)
    if not assembler.complete():
        raise WireError(f"truncated stream: missing {', '.join(assembler.missing())}")
    return assembler.done
