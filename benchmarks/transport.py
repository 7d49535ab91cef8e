"""Data-plane transport: our tensor hop against the raw gRPC ceiling, in one run.

(a) raw: a grpc.aio unary echo of opaque bytes (no protobuf, no tensors), N bytes each way;
    the server returns the very bytes object it received. Shown beside it, not used for the
    ratios: the same echo returning a fresh copy (a reply any real server must build anew).
(b) tensor hop: the real client (``StageClient.hop``) sends an N-byte float32 tensor (plus
    labels) on ``swarm.v1.Stage/Hop``; the server side reassembles and checks it with the
    real ``Assembler`` and finiteness check and sends it back as the gradient through the
    real codecs and framing: everything a hop moves and checks, without a model.
(c) stage hop: the same call to a real ``StageServer`` whose stage is the identity with a
    0.5 * mean(x^2) loss: (b) plus the compute worker, the request checks and an autograd
    forward + backward. Reported end to end and without its compute seconds.

The servers live in a separate process (as a neighbour peer would); the client runs here.
Both processes use ``--threads`` torch threads (default 1, as each peer of a local swarm does):
with torch's default of one thread per core, the two processes' intra-op thread pools fight
over 2 cores and the codecs' figures measure that fight rather than the codecs.
Figures per payload size and codec: median call time, GB/s (2N / time: both directions, in
logical float32 bytes), serialized request bytes, gradient relative error; ratios against
(a). Last line: a JSON object.

    python benchmarks/transport.py [--reps 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import grpc
import torch

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
HIDDEN = 1024  # activations are (1, N / 4096, 1024) float32
ECHO, COPY = "/bench.Echo/Echo", "/bench.Echo/Copy"
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def half_square(out, labels):
    return 0.5 * out.float().pow(2).mean()


async def tensor_echo(requests, context):
    """(b): reassemble and check the tensor like a stage does, then send it back as the gradient."""
    from peer.rpc import stage_pb2 as pb
    from peer.rpc import wire
    from peer.rpc.tensors import PB_TO_CODEC, Assembler, all_finite, pack, tensor_chunks

    assembler, header = Assembler(["hidden", "labels"], 1 << 30), None
    async for message_header, chunks in requests:
        header = header or message_header
        for chunk in chunks:
            assembler.add(chunk)
        if assembler.complete():
            break
    hidden = assembler.done["hidden"]
    assert all_finite(hidden)
    groups = list(pack(tensor_chunks("grad", hidden, PB_TO_CODEC[header.backward_codec])))
    result = pb.HopResult(loss=0.0, samples=hidden.shape[0])
    for i, group in enumerate(groups):
        yield wire.encode_reply(group, result if i == len(groups) - 1 else None)


async def serve() -> None:
    """Child process: the raw echo, the tensor echo and an identity stage server; print their ports."""
    from peer.rpc import wire
    from peer.rpc.client import SERVER_OPTIONS
    from peer.stage.runtime import StageRuntime, StageSpec
    from peer.stage.server import StageServer

    echo = grpc.aio.server(options=OPTIONS)

    async def handle(request: bytes, context) -> bytes:
        return request

    async def handle_copy(request: bytes, context) -> bytes:
        return b"".join([request[:1], request[1:]])  # a new object, one copy

    echo.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(handle),
        "Copy": grpc.unary_unary_rpc_method_handler(handle_copy)}),))
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    tensors = grpc.aio.server(options=SERVER_OPTIONS)
    tensors.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("swarm.v1.Stage", {
        "Hop": grpc.stream_stream_rpc_method_handler(tensor_echo, request_deserializer=wire.parse_request)}),))
    tensor_port = tensors.add_insecure_port("127.0.0.1:0")
    await tensors.start()
    # the last of two stages: it takes hidden states and returns their gradient
    spec = StageSpec("bench", stage=1, num_stages=2, hidden_size=HIDDEN, vocab_size=8, max_microbatch=1,
                     max_seq_len=1 << 16)
    stage = StageServer(StageRuntime(Identity(), spec, loss_fn=half_square), None,
                        max_payload_bytes=1 << 30).start()
    print(f"PORTS {echo_port} {tensor_port} {stage.port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    stage.stop(grace=1)
    await echo.stop(0)
    await tensors.stop(0)


async def one_hop(client, address: str, x, labels, codec: str):
    """Seconds of one hop (encoding included), the server's compute seconds, request bytes, the outcome."""
    from peer.rpc import stage_pb2 as pb
    from peer.rpc.client import request_messages

    header = pb.MicrobatchHeader(run_id="bench", stage=1, budget_s=60,
                                 backward_codec=pb.Codec.Value(f"CODEC_{codec.upper()}"))
    t0 = time.perf_counter()
    messages = request_messages(header, {"hidden": x, "labels": labels}, codec)
    outcome = await client.hop(address, messages, ["grad"], timeout=60)
    seconds = time.perf_counter() - t0
    compute = sum(t.forward_s + t.backward_s for t in outcome.result.timings)
    return seconds, compute, sum(len(m) for m in messages), outcome


async def measure(ports: list[int], reps: int) -> dict:
    """Every repetition calls each variant once, in turn, so machine noise hits them alike."""
    from peer.rpc.client import StageClient
    from peer.rpc.codecs import CODECS

    echo_port, tensor_port, stage_port = ports
    results: dict = {"raw": {}, "tensor": {c: {} for c in CODECS}, "stage": {}}
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}", options=OPTIONS)
    echo, copy = channel.unary_unary(ECHO), channel.unary_unary(COPY)
    client = StageClient()
    tensor_address, stage_address = f"127.0.0.1:{tensor_port}", f"127.0.0.1:{stage_port}"
    for label, size in SIZES.items():
        payload = torch.randn(size // 4).numpy().tobytes()
        x = torch.randn(1, size // 4 // HIDDEN, HIDDEN)
        labels = torch.zeros(1, x.shape[1], dtype=torch.int64)
        raw_t, copy_t, stage_t, stage_c = [], [], [], []
        tensor_t = {c: [] for c in CODECS}
        last: dict = {}
        for i in range(reps + 2):
            t0 = time.perf_counter()
            back = await echo(payload, timeout=60)
            raw_seconds = time.perf_counter() - t0
            assert len(back) == size
            t0 = time.perf_counter()
            assert len(await copy(payload, timeout=60)) == size
            copy_seconds = time.perf_counter() - t0
            for codec in CODECS:
                seconds, _, wire, last[codec] = await one_hop(client, tensor_address, x, labels, codec)
                tensor_t[codec].append(seconds)
                last[codec, "wire"] = wire
            seconds, compute, _, last["stage"] = await one_hop(client, stage_address, x, labels, "none")
            if i >= 2:  # the first two are warm-up
                raw_t.append(raw_seconds)
                copy_t.append(copy_seconds)
                stage_t.append(seconds)
                stage_c.append(compute)
        for codec in CODECS:
            del tensor_t[codec][:2]
        med = statistics.median
        raw = med(raw_t)
        results["raw"][label] = {"ms": raw * 1e3, "GBps": 2 * size / raw / 1e9, "copy_ms": med(copy_t) * 1e3}
        for codec in CODECS:
            hop = med(tensor_t[codec])
            rel = ((last[codec].tensors["grad"] - x).norm() / x.norm()).item()
            results["tensor"][codec][label] = {"ms": hop * 1e3, "GBps": 2 * size / hop / 1e9,
                                               "request_bytes": last[codec, "wire"], "rel_error": rel}
            print(f"{label:>6} {codec:>4}: raw {raw * 1e3:7.2f} ms  tensor hop {hop * 1e3:7.2f} ms "
                  f"({2 * size / hop / 1e9:.2f} GB/s, request {last[codec, 'wire']} B, rel err {rel:.1e})",
                  flush=True)
        assert torch.allclose(last["stage"].tensors["grad"], x / x.numel())  # d(0.5 mean(x^2))/dx
        hop, compute = med(stage_t), med(stage_c)
        results["stage"][label] = {"ms": hop * 1e3, "compute_ms": compute * 1e3, "GBps": 2 * size / hop / 1e9}
        print(f"{label:>6} none: stage hop {hop * 1e3:7.2f} ms, of which {compute * 1e3:.2f} ms forward+backward",
              flush=True)
    await client.close()
    await channel.close()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process (default 1)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        asyncio.run(serve())
        return
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--threads", str(args.threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        if not line.startswith("PORTS"):
            raise SystemExit(f"server process failed to start: {line!r}")
        results = asyncio.run(measure(list(map(int, line.split()[1:])), args.reps))
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
    raw, tensor, stage = results["raw"], results["tensor"], results["stage"]
    summary = {
        "benchmark": "transport",
        "torch_threads_per_process": args.threads,
        "raw_ms": {k: round(v["ms"], 3) for k, v in raw.items()},
        "raw_GBps": {k: round(v["GBps"], 3) for k, v in raw.items()},
        "raw_fresh_reply_ms": {k: round(v["copy_ms"], 3) for k, v in raw.items()},
        "tensor_hop_ms": {c: {k: round(v["ms"], 3) for k, v in r.items()} for c, r in tensor.items()},
        "tensor_hop_GBps": {c: {k: round(v["GBps"], 3) for k, v in r.items()} for c, r in tensor.items()},
        "request_bytes_16MiB": {c: r["16MiB"]["request_bytes"] for c, r in tensor.items()},
        "rel_error": {c: float(f"{r['1MiB']['rel_error']:.2e}") for c, r in tensor.items()},
        "ratio_tensor_hop_vs_raw_GBps": {k: round(tensor["none"][k]["GBps"] / raw[k]["GBps"], 3) for k in SIZES},
        "latency_64KiB_tensor_hop_over_raw": round(tensor["none"]["64KiB"]["ms"] / raw["64KiB"]["ms"], 3),
        "stage_hop_ms": {k: round(v["ms"], 3) for k, v in stage.items()},
        "stage_hop_compute_ms": {k: round(v["compute_ms"], 3) for k, v in stage.items()},
        "stage_hop_without_compute_over_raw": {k: round((v["ms"] - v["compute_ms"]) / raw[k]["ms"], 3)
                                               for k, v in stage.items()},
        "targets": {"ratio_tensor_hop_vs_raw_GBps (>= 1MiB)": 0.8, "latency_64KiB_tensor_hop_over_raw": 1.5},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
