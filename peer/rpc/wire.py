"""Protobuf wire framing of Hop messages with the tensor bytes kept out of the protobuf runtime.

``HopRequest`` and ``HopReply`` are plain ``swarm.v1`` protobuf messages on the wire (any
protobuf client can produce and read them), but going through the protobuf runtime would
copy every payload byte four times per direction. Here the small parts (header, tensor
metadata, result) are serialized by protobuf, and each ``Tensor.data`` field is framed by
hand around a memoryview of the tensor's own bytes, so sending costs one copy (the final
join) and parsing hands out memoryviews into the received buffer. The encoder adds a
``pad`` field where needed so that each ``data`` starts 8-byte aligned in the message,
which lets the receiver use a single-chunk tensor in place, without a copy. Field order
on the wire does not matter to the parser, as protobuf requires.

Messages of at most ``SMALL_MESSAGE`` bytes go through the protobuf runtime both ways:
its copies of a few dozen KiB cost less than framing and scanning fields in Python.
"""

from __future__ import annotations

import dataclasses

from google.protobuf.message import DecodeError

from peer.rpc import stage_pb2 as pb

_LEN = 2  # wire type of length-delimited fields
_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_PAD_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["pad"].number
ALIGN = 8
SMALL_MESSAGE = 256 << 10
_REQ_HEADER = pb.HopRequest.DESCRIPTOR.fields_by_name["header"].number
_REQ_TENSORS = pb.HopRequest.DESCRIPTOR.fields_by_name["tensors"].number
_REP_TENSORS = pb.HopReply.DESCRIPTOR.fields_by_name["tensors"].number
_REP_RESULT = pb.HopReply.DESCRIPTOR.fields_by_name["result"].number


@dataclasses.dataclass
class Chunk:
    """One chunk of an encoded tensor: its metadata (a ``Tensor`` without ``data``) and its bytes."""

    meta: pb.Tensor
    data: memoryview | bytes


_ONE_BYTE = [bytes([i]) for i in range(0x80)]
_PADS = (0, *range(2, 2 + ALIGN))  # pad field sizes that shift the data by 0..ALIGN-1 bytes


def varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _tag(field: int) -> bytes:
    return varint((field << 3) | _LEN)


_DATA_TAG = _tag(_DATA_FIELD)


def _framed(field: int, parts: list, size: int) -> list:
    return [_tag(field), varint(size), *parts]


def _pad_field(size: int) -> bytes:
    """A ``pad`` field of exactly ``size`` bytes (0 or 2..129)."""
    return b"" if size == 0 else _tag(_PAD_FIELD) + varint(size - 2) + bytes(size - 2)


_PAD_BYTES = {size: _pad_field(size) for size in _PADS}


def _chunk_parts(chunk: Chunk, field: int, offset: int) -> list:
    """The framed chunk (as field ``field``) starting at ``offset`` of the message, its data aligned."""
    meta = chunk.meta.SerializeToString()
    data_head = _DATA_TAG + varint(len(chunk.data))
    tag = _tag(field)
    unpadded = len(meta) + len(data_head) + len(chunk.data)
    for pad in _PADS:
        before_data = len(tag) + varint_len(unpadded + pad) + len(meta) + pad + len(data_head)
        if (offset + before_data) % ALIGN == 0:
            break
    return [tag + varint(unpadded + pad), meta, _PAD_BYTES[pad], data_head, chunk.data]


def _message(first_field: int, first: bytes | None, chunks_field: int, chunks: list[Chunk],
             last_field: int | None = None, last: bytes | None = None) -> bytes:
    parts: list = []
    if first is not None:
        parts += _framed(first_field, [first], len(first))
    offset = sum(len(p) for p in parts)
    for chunk in chunks:
        chunk_parts = _chunk_parts(chunk, chunks_field, offset)
        offset += sum(len(p) for p in chunk_parts)
        parts += chunk_parts
    if last is not None:
        parts += _framed(last_field, [last], len(last))
    return b"".join(parts)


def _small(chunks: list[Chunk]) -> bool:
    return sum(len(c.data) for c in chunks) <= SMALL_MESSAGE - 4096


def _tensor(chunk: Chunk) -> pb.Tensor:
    tensor = pb.Tensor()
    tensor.CopyFrom(chunk.meta)
    tensor.data = bytes(chunk.data)
    return tensor


def encode_request(header: pb.MicrobatchHeader | None, chunks: list[Chunk]) -> bytes:
    """A serialized ``HopRequest``."""
    if _small(chunks):
        return pb.HopRequest(header=header, tensors=[_tensor(c) for c in chunks]).SerializeToString()
    return _message(_REQ_HEADER, header.SerializeToString() if header is not None else None, _REQ_TENSORS, chunks)


def encode_reply(chunks: list[Chunk], result: pb.HopResult | None) -> bytes:
    """A serialized ``HopReply``."""
    if _small(chunks):
        return pb.HopReply(tensors=[_tensor(c) for c in chunks], result=result).SerializeToString()
    return _message(0, None, _REP_TENSORS, chunks, _REP_RESULT,
                    result.SerializeToString() if result is not None else None)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos < end and buf[pos] < 0x80:
        return buf[pos], pos + 1
    result = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise DecodeError("bad varint")


def _fields(buf: memoryview, pos: int, end: int):
    """(field number, wire type, key start, value start, value stop) of each field in buf[pos:end]."""
    while pos < end:
        key_start = pos
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        start = pos
        if wire == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LEN:
            size, start = _read_varint(buf, pos, end)
            pos = start + size
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        if pos > end or field == 0:
            raise DecodeError("truncated or invalid field")
        yield field, wire, key_start, start, pos


def _parse_chunk(buf: memoryview, start: int, end: int) -> Chunk:
    meta_parts, data = [], b""
    for field, wire, key_start, value_start, value_end in _fields(buf, start, end):
        if field == _DATA_FIELD and wire == _LEN:
            data = buf[value_start:value_end]
        elif field == _PAD_FIELD:
            continue
        else:
            meta_parts.append(buf[key_start:value_end])
    return Chunk(pb.Tensor.FromString(b"".join(meta_parts)), data)


def parse_request(raw: bytes) -> tuple[pb.MicrobatchHeader | None, list[Chunk]]:
    """Parse a serialized ``HopRequest``. :raises DecodeError: bytes that are not one"""
    if len(raw) <= SMALL_MESSAGE:
        request = pb.HopRequest.FromString(raw)
        header = request.header if request.HasField("header") else None
        return header, [Chunk(t, t.data) for t in request.tensors]
    buf = memoryview(raw)
    header, chunks = None, []
    for field, wire, _, start, stop in _fields(buf, 0, len(buf)):
        if wire != _LEN:
            continue  # unknown scalar field: ignored, as protobuf does
        if field == _REQ_HEADER:
            header = pb.MicrobatchHeader.FromString(buf[start:stop])
        elif field == _REQ_TENSORS:
            chunks.append(_parse_chunk(buf, start, stop))
    return header, chunks


def parse_reply(raw: bytes) -> tuple[list[Chunk], pb.HopResult | None]:
    """Parse a serialized ``HopReply``. :raises DecodeError: bytes that are not one"""
    if len(raw) <= SMALL_MESSAGE:
        reply = pb.HopReply.FromString(raw)
        return [Chunk(t, t.data) for t in reply.tensors], reply.result if reply.HasField("result") else None
    buf = memoryview(raw)
    chunks, result = [], None
    for field, wire, _, start, stop in _fields(buf, 0, len(buf)):
        if wire != _LEN:
            continue
        if field == _REP_TENSORS:
            chunks.append(_parse_chunk(buf, start, stop))
        elif field == _REP_RESULT:
            result = pb.HopResult.FromString(buf[start:stop])
    return chunks, result
