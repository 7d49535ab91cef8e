"""The caller's side of a hop: send a microbatch to a stage peer, get its gradients and result back,
and retry on another peer of that stage when a peer fails.

A :class:`StageClient` belongs to one asyncio loop (grpc.aio channels are loop-bound);
stage servers use one on their serving loop to call the next stage, trainers use one to
call stage 0. Who to call is asked of a :class:`NextHop` (a static list here; the DHT
router implements the same two methods).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
from typing import Callable, Iterable, Protocol

import grpc

from peer.limits import ATTEMPT_TIMEOUT_S, MAX_PAYLOAD_BYTES
from peer.rpc import stage_pb2 as pb
from peer.rpc import stage_pb2_grpc
from peer.rpc import tls, wire
from peer.rpc.tensors import CHUNK_BYTES, Assembler, WireError, pack, tensor_chunks

logger = logging.getLogger(__name__)

HEADER_ALONE_ABOVE = 64 << 10  # payload bytes of a first group above which the header is sent alone
MAX_CHANNELS = 256  # channels a client keeps open (the least recently used one is closed for a new one)
MESSAGE_LIMIT = 8 << 20  # gRPC max message size: a packed group of chunks plus metadata stays far below
# Failures worth another peer of the same stage. INVALID_ARGUMENT is ours (it would fail anywhere).
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS,
}
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
# Servers accept the clients' keepalive pings during long hops (a hop waits for the rest of its route);
# gRPC's defaults would answer them with GOAWAY "too_many_pings".
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


class AckTimeout(WireError):
    """A peer accepted the call but did not acknowledge it in time (hung, or overloaded)."""

    def __init__(self, message: str):
        super().__init__(message, grpc.StatusCode.DEADLINE_EXCEEDED)


class HopFailed(Exception):
    """A hop failed on every peer tried; ``code`` is the gRPC status to pass upstream."""

    def __init__(self, code: grpc.StatusCode, message: str, tried: list[str]):
        super().__init__(message)
        self.code, self.tried = code, tried


@dataclasses.dataclass
class HopOutcome:
    tensors: dict  # name -> torch.Tensor (e.g. "grad")
    result: pb.HopResult
    address: str
    seconds: float
    retries: int = 0


class PinFailure(WireError):
    """No TLS channel to a peer as its record pins it. Anyone can publish a record naming any address, so this
    bans the record (its peer id), not the address."""


class NextHop(Protocol):
    """Chooses the peer for a hop and learns from how it went."""

    def choose(self, exclude: set[str], avoid: frozenset[str] = frozenset(),
               distrusted: frozenset[str] = frozenset()) -> str | None:
        """An address ``host:port`` not in ``exclude``, and not in ``distrusted`` and then ``avoid`` while another is
        left; None if there is none left."""

    def report(self, address: str, ok: bool, seconds: float, by_address: bool = True) -> None:
        """The outcome of a hop to ``address``; ``by_address=False``: the failure is the chosen record's (its
        certificate pin), not the address's, which may well be another, honest peer's."""

    def pin(self, address: str) -> str | None:
        """SHA-256 of the TLS certificate the peer chosen at ``address`` announced (see :mod:`peer.rpc.tls`), or
        None to dial it in plaintext."""


class StaticNextHop:
    """A fixed list of addresses (static wiring, tests, benchmarks): chosen uniformly at random,
    or in list order with ``shuffle=False``.

    :param pins: address -> certificate SHA-256 of the peers that serve TLS
    """

    def __init__(self, addresses: Iterable[str], seed: int | None = None, shuffle: bool = True,
                 pins: dict[str, str] | None = None):
        self.addresses = list(addresses)
        self.rng = random.Random(seed)
        self.shuffle = shuffle
        self.failures: dict[str, int] = {}
        self.pins = dict(pins or {})

    def choose(self, exclude: set[str], avoid: frozenset[str] = frozenset(),
               distrusted: frozenset[str] = frozenset()) -> str | None:
        left = [a for a in self.addresses if a not in exclude]
        if not left:
            return None
        for unwanted in (distrusted, avoid):
            left = [a for a in left if a not in unwanted] or left
        return self.rng.choice(left) if self.shuffle else left[0]

    def report(self, address: str, ok: bool, seconds: float, by_address: bool = True) -> None:
        if not ok:
            self.failures[address] = self.failures.get(address, 0) + 1

    def pin(self, address: str) -> str | None:
        return self.pins.get(address)


def request_messages(header: pb.MicrobatchHeader, tensors: dict, codec: str,
                     chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """The serialized ``HopRequest`` messages of one hop. The header rides with the first group of chunks when that
    is small (token ids); before hidden states it goes alone, so that it reaches the peer within its header deadline
    on a slow link too.

    :param tensors: name -> tensor; float tensors are encoded with ``codec``
    """
    chunks = [c for name, t in tensors.items() for c in tensor_chunks(name, t, codec, chunk_bytes)]
    groups = list(pack(chunks, chunk_bytes)) or [[]]
    if sum(len(c.data) for c in groups[0]) > HEADER_ALONE_ABOVE:
        return [wire.encode_request(header, []), *(wire.encode_request(None, g) for g in groups)]
    return [wire.encode_request(header if i == 0 else None, g) for i, g in enumerate(groups)]


class StageClient:
    """grpc.aio channels to stage peers, cached per address, on the loop that uses them.

    :param credential: ``address -> gRPC metadata`` sent with every hop to that address (an invite-only run's
      signed credential, see :class:`dht.admission.Admission`); None sends none
    """

    def __init__(self, max_payload_bytes: int = MAX_PAYLOAD_BYTES, chunk_bytes: int = CHUNK_BYTES,
                 credential: Callable[[str], list[tuple[str, str]]] | None = None):
        self.max_payload_bytes, self.chunk_bytes = max_payload_bytes, chunk_bytes
        self.credential = credential
        # least recently used first: at most MAX_CHANNELS, however many addresses the records name; each with the
        # certificate hash it is pinned to (None: plaintext), so that a peer's new pin gets a new channel
        self._stubs: collections.OrderedDict[str, tuple[grpc.aio.Channel, stage_pb2_grpc.StageStub,
                                                        grpc.aio.StreamStreamMultiCallable, str | None]] = \
            collections.OrderedDict()

    def _channel(self, address: str, pin: str | None = None, secure=None):
        """The cached channel to ``address`` pinned to ``pin``, else a new one (plaintext, or with ``secure``:
        :func:`peer.rpc.tls.pinned_credentials` of the pinned certificate)."""
        cached = self._stubs.get(address)
        if cached is not None and cached[3] == pin:
            self._stubs.move_to_end(address)
            return cached
        if cached is not None:  # the peer at this address announced another certificate (or none)
            self._close_later(self._stubs.pop(address)[0])
        while len(self._stubs) >= MAX_CHANNELS:
            self._close_later(self._stubs.popitem(last=False)[1][0])
        if pin is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            credentials, options = secure
            channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS + options)
        # Hop bypasses the protobuf runtime for tensor bytes (see peer.rpc.wire); same wire format
        hop = channel.stream_stream("/swarm.v1.Stage/Hop", request_serializer=None,
                                    response_deserializer=wire.parse_reply)
        self._stubs[address] = (channel, stage_pb2_grpc.StageStub(channel), hop, pin)
        return self._stubs[address]

    @staticmethod
    def _close_later(channel: grpc.aio.Channel) -> None:
        asyncio.ensure_future(channel.close(grace=ATTEMPT_TIMEOUT_S))  # calls still on it get their time

    async def _open(self, address: str, pin: str | None, timeout: float = tls.HANDSHAKE_TIMEOUT_S):
        """The channel for a call to ``address``: with a ``pin``, a TLS channel made once the peer has shown the
        pinned certificate (:func:`peer.rpc.tls.pinned`).

        :raises WireError: (UNAVAILABLE) it showed another certificate, or no TLS handshake with it
        """
        cached = self._stubs.get(address)
        if pin is None or (cached is not None and cached[3] == pin):
            return self._channel(address, pin)
        try:
            secure = await tls.pinned(address, pin, timeout)
        except tls.DialError as e:  # a failure of this record, like an unanswered call: its router bans it
            raise PinFailure(str(e), grpc.StatusCode.UNAVAILABLE) from None
        return self._channel(address, pin, secure)

    def stub(self, address: str) -> stage_pb2_grpc.StageStub:
        """A plaintext stub (see :meth:`info` for a pinned peer)."""
        return self._channel(address)[1]

    async def hop(self, address: str, messages: list[bytes], expect: Iterable[str],
                  timeout: float, ack_timeout: float | None = None, pin: str | None = None) -> HopOutcome:
        """One Hop call.

        :param timeout: the whole call (the rest of the route included)
        :param ack_timeout: the peer's first reply (its acknowledgement, sent once it has the request)
            must come within this; a peer that accepts connections but never answers is found out here
        :param pin: SHA-256 of the certificate the peer announced: the call goes over TLS to exactly that one
        :raises grpc.aio.AioRpcError: as the peer or the transport failed it
        :raises WireError: the reply was malformed, or the peer showed another certificate than the pinned one
        :raises AckTimeout: no acknowledgement in time
        """
        channel = await self._open(address, pin, min(ack_timeout or timeout, timeout))
        t0 = time.perf_counter()
        metadata = (self.credential(address) or None) if self.credential is not None else None
        call = channel[2](iter(messages), timeout=timeout, metadata=metadata)
        assembler = Assembler(expect, self.max_payload_bytes)
        result = None
        acknowledged = False
        try:
            # asyncio.timeout (not wait_for) keeps the read on this task: no extra task per hop
            async with asyncio.timeout(ack_timeout or timeout):
                reply = await call.read()
                acknowledged = True
        except TimeoutError:
            if acknowledged:
                raise
            call.cancel()
            raise AckTimeout(f"{address} did not answer within {ack_timeout or timeout:.1f} s") from None
        while reply is not grpc.aio.EOF:
            chunks, reply_result = reply
            for chunk in chunks:
                assembler.add(chunk)
            if reply_result is not None:
                result = reply_result
            reply = await call.read()
        if result is None or not assembler.complete():
            missing = ", ".join(assembler.missing()) or "result"
            raise WireError(f"reply from {address} ended without {missing}", grpc.StatusCode.DATA_LOSS)
        return HopOutcome(assembler.done, result, address, time.perf_counter() - t0)

    async def info(self, address: str, timeout: float = 5.0, pin: str | None = None) -> pb.InfoReply:
        return await (await self._open(address, pin, timeout))[1].Info(pb.InfoRequest(), timeout=timeout)

    async def close(self) -> None:
        for channel, *_ in self._stubs.values():
            await channel.close()
        self._stubs.clear()


async def hop_with_retries(client: StageClient, next_hop: NextHop, messages: list[bytes],
                           expect: Iterable[str], deadline: float, max_attempts: int = 4,
                           attempt_timeout: float = ATTEMPT_TIMEOUT_S,
                           avoid: frozenset[str] = frozenset(), distrusted: frozenset[str] = frozenset()
                           ) -> HopOutcome:
    """Send one hop, retrying on other peers of the stage after a retryable failure.

    :param avoid: addresses (or peer ids) to route around while the stage has another peer
    :param distrusted: the same, before ``avoid``: used only when the stage has no other peer at all

    :param deadline: ``time.monotonic()`` by which the hop must be done
    :param attempt_timeout: how long a peer may take to acknowledge a call (a hung peer costs at most
        this); once it has, the call may take until ``deadline`` (the rest of the route is behind it)
    :raises HopFailed: every attempt failed, no peer was left, or time ran out
    """
    tried: list[str] = []
    errors: list[str] = []
    code = grpc.StatusCode.UNAVAILABLE
    expect = list(expect)
    while len(tried) < max_attempts:
        remaining = deadline - time.monotonic()
        if remaining <= 0.05:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            errors.append("time budget exhausted")
            break
        address = next_hop.choose(set(tried), avoid, distrusted)
        if address is None:
            errors.append("no other peer of the stage" if tried else "no peer of the stage is known")
            break
        tried.append(address)
        t0 = time.perf_counter()
        try:
            outcome = await client.hop(address, messages, expect, timeout=remaining, ack_timeout=attempt_timeout,
                                       pin=next_hop.pin(address))
        except grpc.aio.AioRpcError as e:
            next_hop.report(address, False, time.perf_counter() - t0)
            code = e.code()
            errors.append(f"{address}: {code.name} {e.details() or ''}".strip())
            if code not in RETRYABLE:
                raise HopFailed(code, f"{address} refused the hop: {e.details()}", tried) from None
            logger.debug("hop to %s failed (%s), %d tried", address, code.name, len(tried))
            continue
        except WireError as e:  # a malformed reply, no acknowledgement in time, or not the pinned certificate
            next_hop.report(address, False, time.perf_counter() - t0, by_address=not isinstance(e, PinFailure))
            code = e.code
            errors.append(f"{address}: {e}")
            continue
        next_hop.report(address, True, outcome.seconds)
        outcome.retries = len(tried) - 1
        return outcome
    raise HopFailed(code, f"hop failed after {len(tried)} attempt(s): {'; '.join(errors)}", tried)
