"""A stage's compute: forward and backward jobs on the compute worker, gradient accumulation,
and parameter updates that never happen under a pending backward.

Gradients: the last stage back-propagates each microbatch's mean token loss, so the
parameter gradients accumulated over many microbatches are a *sum of per-microbatch mean
gradients*; an update divides by the number of microbatches (hivemind's convention, see
``peer.stage.averaging``), which for equal microbatches is exactly the gradient of the
baseline's accumulated batch.

Updates drain, then recompute: :meth:`StageRuntime.apply_update` stops admitting new
forwards and waits up to ``drain_timeout`` seconds for every microbatch that ran forward
here to run its backward. Microbatches still pending then drop their saved graph and keep
only their input; their backward recomputes the forward with the new parameters first. So
no backward ever runs on a graph whose parameters changed under it (autograd would be
corrupted); a recomputed microbatch gets the gradient of the new parameters at its input,
as in SWARM's asynchronous updates. ``drain_timeout=None`` always drains fully (exact, slower
in a pipeline: the stage waits for its microbatches' whole round trip before it steps).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Awaitable, Callable

import torch
from torch import nn

from peer.partition import lm_loss
from peer.slowdown import counts_cpu_time
from peer.stage.worker import BACKWARD, FORWARD, UPDATE, ComputeWorker
from peer.training import uses_bf16

logger = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    """The last stage computed a NaN or inf loss: nothing was back-propagated or accumulated."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What a stage serves, and the limits its servicer enforces on requests."""

    run_id: str
    stage: int
    num_stages: int
    hidden_size: int
    vocab_size: int
    max_microbatch: int = 64
    max_seq_len: int = 4096
    fingerprint: str = ""

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


@dataclasses.dataclass(eq=False)
class Activation:
    """What one microbatch leaves on this stage between its forward and its backward."""

    inputs: torch.Tensor  # (B, T) ids or (B, T, H) hidden, requires grad if hidden
    outputs: torch.Tensor | None  # (B, T, H) with the autograd graph; None once it must be recomputed
    version: int  # parameter version the forward ran with


class StageRuntime:
    """Runs one stage module on a device through a :class:`ComputeWorker`.

    :param module: maps the stage input to hidden states, or logits on the last stage
    :param loss_fn: ``(logits, labels) -> scalar`` on the last stage (default: next-token CE)
    :param on_backward: awaited after every backward as ``on_backward(runtime, samples, late)``; the
        place for an optimizer hook that calls :meth:`apply_update` once enough samples accumulated
    :param late_grads: runs every backward and files its gradients under this step or the next
        (:class:`peer.stage.late_grads.LateGradients`); ``late`` above says which
    :param slowdown: emulate a device this many times slower (see :class:`ComputeWorker`)
    :param epoch: ``() -> int``, the stage's optimizer epoch; read on the compute worker right after each forward
        (updates run there too, so it is exactly the epoch the forward ran at) and returned with it
    """

    def __init__(self, module: nn.Module, spec: StageSpec, device: torch.device | str = "cpu",
                 precision: str = "fp32", loss_fn: Callable = lm_loss,
                 on_backward: Callable[["StageRuntime", int, bool], Awaitable[None] | None] | None = None,
                 drain_timeout: float | None = None, slowdown: float = 1.0, late_grads=None,
                 epoch: Callable[[], int] | None = None):
        self.module, self.spec, self.device = module, spec, torch.device(device)
        self.use_bf16 = uses_bf16(precision, self.device)
        self.loss_fn, self.on_backward, self.drain_timeout = loss_fn, on_backward, drain_timeout
        self.late_grads = late_grads
        self.epoch = epoch or (lambda: 0)
        self.worker = ComputeWorker(f"stage{spec.stage}-compute", slowdown, counts_cpu_time(self.device))
        self.version = 0  # bumped by every update
        self.samples_trained = 0  # since the start (samples_accumulated restarts at every update)
        self.samples_accumulated = 0
        self.tokens_accumulated = 0
        self.updates = 0
        self.pending_backward = 0  # microbatches between forward and backward (or abandonment)
        self.version_violations = 0  # must stay 0: a backward saw other parameters than its forward
        self.recomputed = 0  # backwards that recomputed their forward after an update
        self._live: set[Activation] = set()  # activations with a pending backward (worker thread only)
        self._updating = False
        self._cond: asyncio.Condition | None = None

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:  # created lazily on the serving loop
            self._cond = asyncio.Condition()
        return self._cond

    def _autocast(self):
        if not self.use_bf16:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ---- jobs (run on the compute worker thread) ----

    def _forward(self, inputs: torch.Tensor, need_graph: bool) -> tuple[Activation | None, torch.Tensor]:
        x = inputs.to(self.device, non_blocking=True)
        if x.is_floating_point():
            x = x.float().requires_grad_(need_graph)  # (B, T, H)
        with torch.set_grad_enabled(need_graph), self._autocast():
            out = self.module(x)
        sendable = out.detach().float()  # (B, T, H) for the next stage
        act = Activation(x, out, self.version) if need_graph else None
        if act is not None:
            self._live.add(act)
        return act, sendable

    def _run_backward(self, backward: Callable[[], None], samples: int) -> bool:
        """Run a backward; returns whether its gradients belong to the next step (:mod:`peer.stage.late_grads`)."""
        if self.late_grads is None:
            backward()
            return False
        return self.late_grads.run(backward, samples)

    def _backward(self, act: Activation, grad_output: torch.Tensor, samples: int) -> tuple[torch.Tensor | None, bool]:
        self._live.discard(act)
        if act.outputs is None:  # an update happened since the forward: recompute with the new parameters
            self.recomputed += 1
            if act.inputs.is_floating_point():
                act.inputs.grad = None
            with torch.enable_grad(), self._autocast():
                act.outputs = self.module(act.inputs)
        elif act.version != self.version:
            self.version_violations += 1
            logger.error("backward under changed parameters (forward v%d, now v%d)", act.version, self.version)
        grad_output = grad_output.to(self.device, dtype=act.outputs.dtype)
        late = self._run_backward(lambda: act.outputs.backward(grad_output), samples)
        return (act.inputs.grad.detach() if act.inputs.is_floating_point() else None), late

    def _update(self, fn: Callable[[], None]) -> None:
        for act in self._live:  # still pending: free the graphs, their backward recomputes
            act.outputs = None
        fn()

    def _last(self, inputs: torch.Tensor, labels: torch.Tensor, backward: bool):
        x = inputs.to(self.device, non_blocking=True)
        if x.is_floating_point():
            x = x.float().requires_grad_(backward)
        late = False
        with torch.set_grad_enabled(backward):
            with self._autocast():
                logits = self.module(x)  # (B, T, V)
            loss = self.loss_fn(logits, labels.to(self.device))
            value = loss.item()  # the one device sync of this job
            if backward:
                if not math.isfinite(value):  # its gradients would poison the whole epoch's accumulation
                    raise NonFiniteLoss(f"loss is {value}: not back-propagated")
                late = self._run_backward(loss.backward, inputs.shape[0])
        grad = x.grad.detach() if backward and x.is_floating_point() else None
        return value, grad, backward and late

    # ---- async API (on the serving loop) ----

    async def admit_forward(self) -> None:
        """Wait while an update is draining; then count one more pending backward."""
        async with self.cond:
            await self.cond.wait_for(lambda: not self._updating)
            self.pending_backward += 1

    async def release(self, act: Activation | None = None) -> None:
        """The microbatch admitted by :meth:`admit_forward` is done: its backward ran, or it was abandoned
        (its upstream went away, its downstream failed: pass its ``act``); its activations can be dropped."""
        if act is not None:
            self.worker.submit(lambda: self._live.discard(act), BACKWARD)
        async with self.cond:
            self.pending_backward -= 1
            self.cond.notify_all()

    async def forward(self, inputs: torch.Tensor, need_graph: bool):
        """:returns: ((activation, output), seconds queued, seconds computing, the optimizer epoch it ran at)"""
        t0 = time.perf_counter()
        (result, epoch), waited = await self.worker.run(lambda: (self._forward(inputs, need_graph), self.epoch()),
                                                        FORWARD)
        return result, waited, time.perf_counter() - t0 - waited, epoch

    async def backward(self, act: Activation, grad_output: torch.Tensor, samples: int, tokens: int):
        """Back-propagate, release the microbatch, count its samples and run the ``on_backward`` hook.

        :returns: (input grad or None, seconds queued, seconds computing)
        """
        t0 = time.perf_counter()
        try:
            (grad, late), waited = await self.worker.run(lambda: self._backward(act, grad_output, samples), BACKWARD)
        finally:
            await self.release()
        seconds = time.perf_counter() - t0 - waited
        await self._accumulated(samples, tokens, late)
        return grad, waited, seconds

    async def last_stage(self, inputs: torch.Tensor, labels: torch.Tensor, backward: bool):
        """Forward, loss and (optionally) backward in one job.

        :returns: ((loss, grad), queued s, compute s, the optimizer epoch it ran at)"""
        if backward:
            await self.admit_forward()
        t0 = time.perf_counter()
        try:
            (loss, grad, late, epoch), waited = await self.worker.run(
                lambda: (*self._last(inputs, labels, backward), self.epoch()), BACKWARD)
        finally:
            if backward:
                await self.release()
        seconds = time.perf_counter() - t0 - waited
        if backward:
            await self._accumulated(inputs.shape[0], labels.numel(), late)
        return (loss, grad), waited, seconds, epoch

    @property
    def compute_s(self) -> float:
        """Seconds the worker has spent on forward and backward jobs since the start."""
        return self.worker.busy_s["forward"] + self.worker.busy_s["backward"]

    async def _accumulated(self, samples: int, tokens: int, late: bool) -> None:
        self.samples_trained += samples
        self.samples_accumulated += samples
        self.tokens_accumulated += tokens
        if self.on_backward is not None:
            maybe = self.on_backward(self, samples, late)
            if asyncio.iscoroutine(maybe):
                await maybe

    async def apply_update(self, fn: Callable[[], None]) -> None:
        """Drain (up to ``drain_timeout``), then run ``fn`` (e.g. an optimizer step) on the worker.

        New forwards wait; microbatches already past their forward finish first, or switch to
        recompute (see the module docstring). Resets the sample counters, bumps the parameter version.
        """
        async with self.cond:
            await self.cond.wait_for(lambda: not self._updating)
            self._updating = True
            try:
                try:
                    async with asyncio.timeout(self.drain_timeout):
                        await self.cond.wait_for(lambda: self.pending_backward == 0)
                except TimeoutError:
                    logger.debug("update with %d microbatch(es) pending: they will recompute", self.pending_backward)
                await self.worker.run(lambda: self._update(fn), UPDATE)
                self.version += 1
                self.updates += 1
                self.samples_accumulated = self.tokens_accumulated = 0
            finally:
                self._updating = False
                self.cond.notify_all()

    async def no_update(self) -> None:
        """Return once no update is under way (one that starts later is not waited for)."""
        async with self.cond:
            await self.cond.wait_for(lambda: not self._updating)

    def stop(self) -> None:
        self.worker.stop()
