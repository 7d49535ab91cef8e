"""Helpers for data-plane tests: in-process stage chains, stage subprocesses, a raw hop client."""

from __future__ import annotations

import asyncio
import contextlib
import select
import subprocess
import sys
import time

import torch

from peer.model import build_model
from peer.partition import split_model
from peer.rpc import stage_pb2 as pb
from peer.rpc.client import StageClient, StaticNextHop, hop_with_retries, request_messages
from peer.stage.runtime import StageRuntime, StageSpec
from peer.stage.server import StageServer

RUN = "test-run"


def run_async(coro, timeout: float = 120.0):
    """Run a coroutine on a fresh standard event loop (independent of any installed policy)."""
    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


def send(address_or_hop, x, y, *, stage=0, codec="none", backward_codec=None, forward_only=False, budget=60.0,
         run_id=RUN, max_attempts=4, credential=None):
    """One microbatch from a trainer to stage ``stage``; returns the HopOutcome.

    :param credential: ``() -> gRPC metadata`` sent with the hop (an invite-only run's)
    """

    async def go():
        client = StageClient(credential=credential)
        next_hop = address_or_hop if not isinstance(address_or_hop, str) else StaticNextHop([address_or_hop])
        header = pb.MicrobatchHeader(run_id=run_id, microbatch_id="mb", trainer_id="test", stage=stage,
                                     budget_s=budget, forward_only=forward_only,
                                     forward_codec=pb.Codec.Value(f"CODEC_{codec.upper()}"),
                                     backward_codec=pb.Codec.Value(f"CODEC_{(backward_codec or codec).upper()}"))
        name = "input_ids" if stage == 0 else "hidden"
        messages = request_messages(header, {name: x, "labels": y}, codec)
        try:
            return await hop_with_retries(client, next_hop, messages, [] if stage == 0 or forward_only else ["grad"],
                                          time.monotonic() + budget, max_attempts=max_attempts)
        finally:
            await client.close()

    return run_async(go(), timeout=budget + 30)


@contextlib.contextmanager
def stage_chain(stages, vocab, *, replicas=None, run_id=RUN, server_kwargs=None, runtime_kwargs=None):
    """Start one in-process StageServer per stage module (last first, so each knows its next stage).

    :param replicas: optional {stage: [extra modules]} served as more replicas of that stage
    :yields: list (per stage) of lists of servers
    """
    num = len(stages)
    servers: list[list[StageServer]] = [[] for _ in range(num)]
    try:
        for k in reversed(range(num)):
            modules = [stages[k], *((replicas or {}).get(k, []))]
            next_hop = StaticNextHop([s.address for s in servers[k + 1]], seed=k) if k + 1 < num else None
            for module in modules:
                spec = StageSpec(run_id, k, num, stages[0].config.hidden_size, vocab)
                runtime = StageRuntime(module, spec, **(runtime_kwargs or {}).get(k, {}))
                servers[k].append(StageServer(runtime, next_hop, **(server_kwargs or {}).get(k, {})).start())
        yield servers
    finally:
        for group in servers:
            for server in group:
                server.stop(grace=2)


def reference_grads(preset, vocab, seq, x, y, seed=0):
    """Loss and parameter gradients of the unpartitioned model for loss.backward()."""
    from peer.partition import lm_loss

    full = build_model(preset, vocab, seq, seed)
    loss = lm_loss(full(x).logits, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in full.named_parameters()}


def fresh_stages(preset, vocab, seq, num, seed=0):
    return split_model(build_model(preset, vocab, seq, seed), num)


class StageProcess:
    """``python -m peer.stage.launch`` in a subprocess; killed at exit of the context."""

    def __init__(self, *args: str, timeout: float = 60.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "peer.stage.launch", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("LISTENING ") or self.proc.poll() is not None:
                break
        if not line.startswith("LISTENING "):
            self.kill()
            raise RuntimeError(f"stage process did not start: {self.proc.stderr.read()[-2000:]}")
        self.address = line.split()[1]

    def wait_for_line(self, prefix: str, timeout: float = 30.0) -> str:
        """The next stdout line that starts with ``prefix`` (e.g. ``FORWARD`` under ``--delay``)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if select.select([self.proc.stdout], [], [], remaining)[0]:
                line = self.proc.stdout.readline()
                if line.startswith(prefix):
                    return line
                assert line, f"the stage process exited before printing {prefix}: {self.proc.stderr.read()[-2000:]}"
        raise AssertionError(f"no {prefix} line from the stage process within {timeout} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def grads_of(modules):
    return {n: p.grad for m in modules for n, p in m.named_parameters() if p.grad is not None}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) <= set(b), set(a) - set(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


def tokens(vocab, batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)
