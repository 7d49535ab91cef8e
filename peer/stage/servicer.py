"""The gRPC side of a stage peer: the Hop protocol, with every request checked before any compute.

One Hop call = one microbatch through this stage: read the header and the input
tensors, run forward, either compute the loss here (last stage) or send the output to a
next-stage peer (retrying on others) and wait for its gradient, run backward, and reply
with the input gradient and the result. Statuses a caller can get:

=====================  =====================================================================
INVALID_ARGUMENT       malformed message, missing header, wrong tensor names/dtype/shape/hidden
                       size, token ids out of range, NaN/inf, truncated or inconsistent chunks
FAILED_PRECONDITION    another run id or another stage than this peer serves
RESOURCE_EXHAUSTED     payload over the limit, or the in-flight cap is reached (try another peer)
UNAVAILABLE            the peer is shutting down, or no next-stage peer could take the hop
DEADLINE_EXCEEDED      the caller's deadline (or the header's budget) ran out
=====================  =====================================================================

The server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
import torch

from peer.limits import ATTEMPT_TIMEOUT_S, MAX_PAYLOAD_BYTES
from peer.rpc import stage_pb2 as pb
from peer.rpc import wire
from peer.rpc.client import HopFailed, NextHop, StageClient, hop_with_retries, request_messages
from peer.rpc.tensors import CHUNK_BYTES, PB_TO_CODEC, Assembler, WireError, all_finite, pack, tensor_chunks
from peer.stage.runtime import NonFiniteLoss, StageRuntime

logger = logging.getLogger(__name__)

_END = object()  # a request stream's end
ACK = b""  # an empty HopReply: sent as soon as a request is read and checked
READ_TIMEOUT_S = 30.0  # a caller that stops sending mid-request for this long is cut off
DEFAULT_BUDGET_S = 120.0  # when neither a deadline nor a budget is given, and the most a caller may ask for
HEADER_TIMEOUT_S = 5.0  # a call whose header has not arrived after this long is cut off (it holds no slot meanwhile)
MAX_STREAMS_PER_CALLER = 64  # open Hop calls from one address; more get RESOURCE_EXHAUSTED at once
DENY_READ_S = 0.5  # a refused caller's first message is read (then dropped) for at most this long
MAX_AVOID = 64  # addresses a header may ask every stage to route around
MAX_ADDRESS_CHARS = 300


class HopError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class StageServicer:
    """Serves ``swarm.v1.Stage`` for one :class:`StageRuntime`.

    :param next_hop: chooses next-stage peers (None on the last stage)
    :param max_in_flight: microbatches served at once (counted from a valid header on); more get RESOURCE_EXHAUSTED
    :param max_budget_s: the most time a call may ask this peer (and the rest of its route) to take
    """

    def __init__(self, runtime: StageRuntime, next_hop: NextHop | None = None, max_in_flight: int = 16,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES, max_attempts: int = 4,
                 attempt_timeout: float = ATTEMPT_TIMEOUT_S,
                 peer_name: str = "", version: str = "", admission=None, max_budget_s: float = DEFAULT_BUDGET_S):
        self.runtime, self.spec, self.next_hop = runtime, runtime.spec, next_hop
        # no request may declare more than this stage's own inputs can take
        self.max_in_flight, self.max_payload_bytes = max_in_flight, min(max_payload_bytes, input_bytes(runtime.spec))
        self.max_budget_s = max_budget_s
        self._streams: dict[str, int] = {}  # open Hop calls per caller address
        self.max_attempts, self.attempt_timeout = max_attempts, attempt_timeout
        self.peer_name, self.version = peer_name, version
        self.admission = admission  # dht.admission.Admission: an invite-only run checks every caller's credential
        self.endpoint = ""  # this peer's address as its callers dial it (the server sets it once it listens)
        self.client = StageClient(max_payload_bytes, credential=admission.credential if admission else None)
        self.in_flight = 0
        self.state = "serving"
        self.counters = {"hops": 0, "ok": 0, "rejected": 0, "failed": 0, "retries": 0, "downstream_failures": 0,
                         "denied": 0}
        self._idle = asyncio.Event()
        self._idle.set()
        if not self.spec.is_last and next_hop is None:
            raise ValueError("a stage that is not the last needs a next_hop")

    # ---- request intake ----

    def _expected(self) -> list[str]:
        return ["input_ids" if self.spec.is_first else "hidden", "labels"]

    def _check_header(self, header: pb.MicrobatchHeader) -> None:
        if header.run_id != self.spec.run_id:
            raise HopError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"this peer serves run {self.spec.run_id!r}, the request is for run {header.run_id!r}")
        if header.stage != self.spec.stage:
            raise HopError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"this peer serves stage {self.spec.stage}, the request is for stage {header.stage}")
        for codec in (header.forward_codec, header.backward_codec):
            if codec not in PB_TO_CODEC:
                raise HopError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown codec {codec} in the header")
        for name, addresses in (("avoid", header.avoid), ("distrusted", header.distrusted)):
            if len(addresses) > MAX_AVOID or any(len(a) > MAX_ADDRESS_CHARS for a in addresses):
                raise HopError(grpc.StatusCode.INVALID_ARGUMENT, f"the header's {name} list takes at most {MAX_AVOID} "
                                                                 f"addresses of {MAX_ADDRESS_CHARS} characters")

    @staticmethod
    def _parsed(request) -> tuple:
        if request is None:
            raise HopError(grpc.StatusCode.INVALID_ARGUMENT, "malformed HopRequest (cannot parse)")
        return request

    async def _read(self, requests, first: list) -> dict:
        """The complete input tensors: the first message's chunks, then the rest of the stream's."""
        assembler = Assembler(self._expected(), self.max_payload_bytes)
        for chunk in first:
            assembler.add(chunk)
        if assembler.complete():
            return assembler.done
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                async for request in requests:
                    message_header, chunks = self._parsed(request)
                    if message_header is not None:
                        raise HopError(grpc.StatusCode.INVALID_ARGUMENT, "only the first HopRequest may carry a header")
                    for chunk in chunks:
                        assembler.add(chunk)
                    if assembler.complete():
                        return assembler.done
        except TimeoutError:
            raise HopError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"request not complete after {READ_TIMEOUT_S:.0f} s") from None
        raise HopError(grpc.StatusCode.INVALID_ARGUMENT, f"truncated stream: missing {', '.join(assembler.missing())}")

    def _check_tensors(self, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        x, labels = tensors[self._expected()[0]], tensors["labels"]
        if labels.dtype != torch.int64 or labels.dim() != 2:
            raise WireError(f"labels must be int64 (B, T), got {labels.dtype} {list(labels.shape)}")
        batch, seq = labels.shape
        if not (1 <= batch <= spec.max_microbatch and 1 <= seq <= spec.max_seq_len):
            raise WireError(f"microbatch {batch} x {seq} is outside 1..{spec.max_microbatch} x 1..{spec.max_seq_len}")
        if ((labels < 0) & (labels != -100)).any() or (labels >= spec.vocab_size).any():
            raise WireError(f"labels out of range [0, {spec.vocab_size}) (or -100)")
        if spec.is_first:
            if x.dtype != torch.int64 or tuple(x.shape) != (batch, seq):
                raise WireError(f"input_ids must be int64 {[batch, seq]}, got {x.dtype} {list(x.shape)}")
            if (x < 0).any() or (x >= spec.vocab_size).any():
                raise WireError(f"input_ids out of range [0, {spec.vocab_size})")
        else:
            if not x.is_floating_point() or tuple(x.shape) != (batch, seq, spec.hidden_size):
                raise WireError(f"hidden must be float {[batch, seq, spec.hidden_size]}, "
                                f"got {x.dtype} {list(x.shape)}")
            if not all_finite(x):
                raise WireError("hidden contains NaN or inf")
        return x, labels

    # ---- the hop ----

    async def _check_caller(self, requests, context) -> None:
        """In an invite-only run, end the call with PERMISSION_DENIED unless its caller's credential is valid."""
        if self.admission is None:
            return
        problem = self.admission.caller_problem(context.invocation_metadata() or (), self.spec.stage == 0,
                                                self.endpoint)
        if problem:
            self.counters["denied"] += 1
            if self.counters["denied"] in (1, 10, 100) or self.counters["denied"] % 1000 == 0:
                logger.warning("refused a hop from %s (%d refused so far): %s", context.peer(),
                               self.counters["denied"], problem)
            with contextlib.suppress(TimeoutError):  # gRPC reports an abort before any message read as INTERNAL
                async with asyncio.timeout(DENY_READ_S):
                    async for _ in requests:
                        break
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)

    async def Hop(self, requests, context: grpc.aio.ServicerContext):
        t_start = time.perf_counter()
        self.counters["hops"] += 1
        admitted, act, header, counted = False, None, None, False
        caller = _address(context.peer())
        self._streams[caller] = self._streams.get(caller, 0) + 1  # before the credential: refused calls count too
        try:
            self._check_streams(caller)
            await self._check_caller(requests, context)
            header, first = await self._header(requests)
            counted = self._count_in()
            x, labels = await self._intake(requests, first)
            deadline = self._deadline(header, context)
            yield ACK  # the request is in and valid: the caller now knows this peer is alive
            timing = pb.HopTiming(stage=self.spec.stage, peer=self.peer_name)
            backward = not header.forward_only
            if self.spec.is_last:
                loss, grad = await self._last_stage(x, labels, backward, timing)
                downstream = []
            else:
                if backward:
                    await self.runtime.admit_forward()
                    admitted = True
                (act, out), timing.queue_s, timing.forward_s, timing.epoch = await self.runtime.forward(x, backward)
                t_down = time.perf_counter()
                outcome = await self._downstream(header, out, labels, deadline)
                timing.downstream_s = time.perf_counter() - t_down
                timing.retries, timing.next = outcome.retries, outcome.address
                loss, downstream = outcome.result.loss, list(outcome.result.timings)
                grad = None
                if backward:
                    grad_out = self._checked_grad(outcome, out)
                    admitted = False  # backward releases it
                    grad, wait_b, timing.backward_s = await self.runtime.backward(
                        act, grad_out, labels.shape[0], labels.numel())
                    timing.queue_s += wait_b
            timing.total_s = time.perf_counter() - t_start
            result = pb.HopResult(loss=loss, samples=labels.shape[0], timings=[timing, *downstream])
            groups = self._reply_groups(header, grad)
            for i, group in enumerate(groups):
                yield wire.encode_reply(group, result if i == len(groups) - 1 else None)
            self.counters["ok"] += 1
        except HopError as e:
            self.counters["rejected" if e.code != grpc.StatusCode.UNAVAILABLE else "failed"] += 1
            logger.debug("%s refused: %s %s", _which(header), e.code.name, e)
            if admitted:  # released before the caller hears of the failure, not after
                admitted = False
                await self.runtime.release(act)
            await context.abort(e.code, str(e))
        except asyncio.CancelledError:
            self.counters["failed"] += 1
            logger.debug("%s cancelled by the caller", _which(header))
            raise
        finally:
            if admitted:
                await self.runtime.release(act)
            self._close_stream(caller, counted)

    def _check_streams(self, caller: str) -> None:
        if self._streams[caller] > MAX_STREAMS_PER_CALLER:
            raise HopError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_STREAMS_PER_CALLER} calls from {caller} "
                                                               f"already open")

    def _count_in(self) -> bool:
        """Take a slot for a microbatch whose header is valid (RESOURCE_EXHAUSTED when none is left)."""
        if self.in_flight >= self.max_in_flight:
            raise HopError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"peer busy: {self.max_in_flight} microbatches in flight")
        self.in_flight += 1
        self._idle.clear()
        return True

    def _close_stream(self, caller: str, counted: bool) -> None:
        self._streams[caller] -= 1
        if not self._streams[caller]:
            del self._streams[caller]
        if counted:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _header(self, requests) -> tuple[pb.MicrobatchHeader, list]:
        """The first HopRequest's header, checked, and its chunks; it must come within :data:`HEADER_TIMEOUT_S`."""
        if self.state != "serving":
            raise HopError(grpc.StatusCode.UNAVAILABLE, f"peer is {self.state}; use another peer of the stage")
        try:
            async with asyncio.timeout(HEADER_TIMEOUT_S):
                request = await anext(aiter(requests), _END)
        except TimeoutError:
            raise HopError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no header within {HEADER_TIMEOUT_S:.0f} s") from None
        if request is _END:
            raise HopError(grpc.StatusCode.INVALID_ARGUMENT, "empty request stream")
        header, chunks = self._parsed(request)
        if header is None:
            raise HopError(grpc.StatusCode.INVALID_ARGUMENT, "the first HopRequest must carry the header")
        self._check_header(header)
        return header, chunks

    async def _intake(self, requests, first: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's input and labels, read and checked (a HopError for the caller otherwise)."""
        try:
            tensors = await self._read(requests, first)
            return self._check_tensors(tensors)
        except WireError as e:
            raise HopError(e.code, str(e)) from None

    async def _last_stage(self, x: torch.Tensor, labels: torch.Tensor, backward: bool,
                          timing: pb.HopTiming) -> tuple[float, torch.Tensor | None]:
        """The last stage's loss and input gradient (None without backward); fills in the timing's queue and
        forward seconds."""
        try:
            (loss, grad), timing.queue_s, timing.forward_s, timing.epoch = await self.runtime.last_stage(
                x, labels, backward)
        except NonFiniteLoss as e:
            raise HopError(grpc.StatusCode.UNAVAILABLE, f"stage {self.spec.stage}: {e}") from None
        return loss, grad

    @staticmethod
    def _reply_groups(header: pb.MicrobatchHeader, grad: torch.Tensor | None) -> list[list]:
        """The gradient's chunks grouped into reply messages; one empty group when there is no gradient."""
        groups = []
        if grad is not None:
            groups = list(pack(tensor_chunks("grad", grad, PB_TO_CODEC[header.backward_codec], CHUNK_BYTES)))
        return groups or [[]]

    def _deadline(self, header: pb.MicrobatchHeader, context) -> float:
        remaining = context.time_remaining()
        budget = min(header.budget_s if header.budget_s > 0 else DEFAULT_BUDGET_S, self.max_budget_s)
        if remaining is not None:
            budget = min(budget, remaining)
        return time.monotonic() + budget - 0.05  # leave the reply some time to travel back

    async def _downstream(self, header, out: torch.Tensor, labels: torch.Tensor, deadline: float):
        down = pb.MicrobatchHeader()
        down.CopyFrom(header)
        down.stage = self.spec.stage + 1
        down.budget_s = max(0.0, deadline - time.monotonic())
        messages = request_messages(down, {"hidden": out, "labels": labels}, PB_TO_CODEC[header.forward_codec])
        expect = [] if header.forward_only else ["grad"]
        try:
            outcome = await hop_with_retries(self.client, self.next_hop, messages, expect, deadline,
                                             self.max_attempts, self.attempt_timeout, frozenset(header.avoid),
                                             frozenset(header.distrusted))
        except HopFailed as e:
            self.counters["downstream_failures"] += len(e.tried)
            self.counters["retries"] += max(0, len(e.tried) - 1)
            code = e.code if e.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INVALID_ARGUMENT) \
                else grpc.StatusCode.UNAVAILABLE
            raise HopError(code, f"stage {self.spec.stage + 1}: {e}") from None
        self.counters["retries"] += outcome.retries
        self.counters["downstream_failures"] += outcome.retries
        return outcome

    def _checked_grad(self, outcome, out: torch.Tensor) -> torch.Tensor:
        grad = outcome.tensors["grad"]
        if tuple(grad.shape) != tuple(out.shape) or not grad.is_floating_point():
            problem = f"{grad.dtype} {list(grad.shape)}, expected a float {list(out.shape)}"
        elif not all_finite(grad):
            problem = "it contains NaN or inf"
        else:
            return grad
        raise HopError(grpc.StatusCode.UNAVAILABLE,
                       f"stage {self.spec.stage + 1} peer {outcome.address} returned a bad gradient ({problem})")

    # ---- info and lifecycle ----

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoReply:
        s, r = self.spec, self.runtime
        return pb.InfoReply(
            run_id=s.run_id, stage=s.stage, num_stages=s.num_stages, model_fingerprint=s.fingerprint,
            hidden_size=s.hidden_size, vocab_size=s.vocab_size, max_microbatch=s.max_microbatch,
            max_seq_len=s.max_seq_len, in_flight=self.in_flight, max_in_flight=self.max_in_flight,
            queue=r.worker.queue_size, samples_accumulated=r.samples_accumulated, updates=r.updates,
            retries=self.counters["retries"], failures=self.counters["downstream_failures"],
            version=self.version, max_payload_bytes=self.max_payload_bytes, state=self.state,
        )

    async def drain(self, timeout: float) -> bool:
        """Refuse new hops and wait up to ``timeout`` s for the in-flight ones; True if all finished."""
        self.state = "draining"
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def _address(peer: str) -> str:
    """The caller's address without its port (``ipv4:203.0.113.5:41234`` -> ``ipv4:203.0.113.5``)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def input_bytes(spec) -> int:
    """The most payload a hop to this stage can carry: its largest microbatch of inputs (float32 hidden states or
    int64 ids) and int64 labels."""
    tokens = spec.max_microbatch * spec.max_seq_len
    return tokens * (8 + (8 if spec.is_first else 4 * spec.hidden_size)) + 4096


def _which(header: pb.MicrobatchHeader | None) -> str:
    """The microbatch a log line is about, as its header names it (the trainer counts attempts from 0)."""
    if header is None:
        return "a hop (no valid header yet)"
    return f"microbatch {header.microbatch_id[:80]!r} (attempt {header.attempt + 1})"

