"""A 2-stage chain over gRPC against the same two stage modules run back to back in one process.

Chain: two stage processes (``python -m peer.stage.launch``, one torch thread each, so the
chain uses the machine's two cores) on 127.0.0.1; a driver here keeps K microbatches in
flight (K = 1, 2, 4, 8), each a real hop: tokens -> stage 0 -> stage 1 (loss) -> gradients
back. Local: the same stages (same weights) in this process, forward and backward of each
microbatch back to back, the best of 1 thread and all threads (two runs each). Figures:
tokens/s of each and their ratio per K.
Last line: a JSON object.

    python benchmarks/pipeline_hop.py [--preset llama-14m] [--microbatches 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import torch

from peer.partition import build_stage, lm_loss
from peer.rpc import stage_pb2 as pb
from peer.rpc.client import StageClient, request_messages

RUN = "bench"


def launch(preset, vocab, seq, stage, next_address=None):
    args = [sys.executable, "-m", "peer.stage.launch", "--preset", preset, "--vocab-size", str(vocab),
            "--seq-len", str(seq), "--stage", str(stage), "--num-stages", "2", "--run-id", RUN, "--threads", "1",
            "--max-in-flight", "64"]
    if next_address:
        args += ["--next", next_address]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("LISTENING"):
        proc.kill()
        raise SystemExit(f"stage {stage} did not start")
    return proc, line.split()[1]


async def drive(address: str, batches, in_flight: int) -> float:
    """Send every microbatch with ``in_flight`` of them outstanding; return the elapsed seconds."""
    client = StageClient()
    queue = list(enumerate(batches))

    async def worker():
        while queue:
            i, (x, y) = queue.pop(0)
            header = pb.MicrobatchHeader(run_id=RUN, microbatch_id=str(i), stage=0, budget_s=300)
            await client.hop(address, request_messages(header, {"input_ids": x, "labels": y}, "none"), [], 300)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed


def local(stages, batches) -> float:
    """Seconds to run forward + backward of every microbatch through both stages, back to back."""
    t0 = time.perf_counter()
    for x, y in batches:
        out0 = stages[0](x)  # (B, T, H)
        h = out0.detach().requires_grad_()
        loss = lm_loss(stages[1](h), y)
        loss.backward()
        out0.backward(h.grad)
    return time.perf_counter() - t0


def best_local(stages, batches) -> float:
    """The faster of 1 and all torch threads, two runs each: the strongest single-process figure."""
    threads = torch.get_num_threads()
    try:
        times = []
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            times += [local(stages, batches) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-14m")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--microbatch-size", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=24)
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, args.vocab_size, (args.microbatch_size, args.seq_len), generator=g),
                torch.randint(0, args.vocab_size, (args.microbatch_size, args.seq_len), generator=g))
               for _ in range(args.microbatches)]
    tokens = args.microbatches * args.microbatch_size * args.seq_len
    stages = [build_stage(args.preset, args.vocab_size, args.seq_len, 0, k, 2) for k in range(2)]
    local(stages, batches)  # warm-up (allocator, kernels)
    procs = []
    try:
        last, last_address = launch(args.preset, args.vocab_size, args.seq_len, 1)
        procs.append(last)
        first, first_address = launch(args.preset, args.vocab_size, args.seq_len, 0, last_address)
        procs.append(first)
        asyncio.run(drive(first_address, batches, 2))  # warm-up
        rows = {}
        for k in args.in_flight:
            local_tps = tokens / best_local(stages, batches)
            chain_tps = tokens / asyncio.run(drive(first_address, batches, k))
            rows[k] = {"chain_tokens_per_s": round(chain_tps, 1), "local_tokens_per_s": round(local_tps, 1),
                       "ratio": round(chain_tps / local_tps, 3)}
            print(f"K={k}: chain {chain_tps:,.0f} tok/s, local {local_tps:,.0f} tok/s, "
                  f"ratio {chain_tps / local_tps:.2f}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps({"benchmark": "pipeline_hop", "preset": args.preset, "microbatch": [args.microbatch_size,
                      args.seq_len], "microbatches": args.microbatches,
                      "local_threads": f"best of 1 and {torch.get_num_threads()}",
                      "chain_threads_per_stage": 1, "by_in_flight": rows}))


if __name__ == "__main__":
    main()
