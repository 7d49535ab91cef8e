"""The static pipeline's bubble: measured step time against the ideal, and the GPipe formula.

For S = 2 stages (one worker process each, one torch thread each) and M = 1, 2, 4, 8
microbatches of a fixed global batch: the pipeline's median step time (``swarm-peer
pipeline``'s own timer), the ideal step time = the slower stage's forward + backward
compute for the whole batch measured in this process with one thread (a stage that never
waits), the measured bubble fraction 1 - ideal / measured, and GPipe's (S-1)/(M+S-1)
beside it. Then tokens/s of gpipe vs 1f1b (at the largest M) vs the single-process
baseline (all threads) in the same run. Last line: a JSON object.

    python benchmarks/pipeline_bubble.py [--preset llama-14m] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from peer.baseline import train_baseline
from peer.config import load_config
from peer.data import load_data
from peer.partition import build_stage, lm_loss
from peer.pipeline.launcher import launch
from peer.training import StopFlag


def stage_compute(preset: str, vocab: int, seq: int, batch: int, micro: int, stages: int, reps: int = 3) -> list[float]:
    """Per stage: seconds of forward + backward for the whole batch in microbatches, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (micro, seq), generator=g)
        y = torch.randint(0, vocab, (micro, seq), generator=g)
        modules = [build_stage(preset, vocab, seq, 0, k, stages) for k in range(stages)]
        inputs, times = [x], []
        for k, module in enumerate(modules):  # inputs of each stage, computed once
            if k + 1 < stages:
                inputs.append(module(inputs[-1]).detach())
        for k, module in enumerate(modules):
            runs = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(batch // micro):
                    inp = inputs[k].clone().requires_grad_(k > 0) if k > 0 else inputs[k]
                    out = module(inp)
                    if k == stages - 1:
                        lm_loss(out, y).backward()
                    else:
                        out.backward(torch.ones_like(out))
                runs.append(time.perf_counter() - t0)
            times.append(min(runs))
        return times
    finally:
        torch.set_num_threads(threads)


def run_pipeline(base: dict, tmp: Path, name: str, **fields) -> dict:
    cfg = load_config({**base, **fields, "run_dir": tmp / name})
    return launch(cfg, StopFlag())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-14m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stages = 2
    base = dict(preset=args.preset, stages=stages, batch_size=args.batch_size, max_steps=args.steps + 2,
                eval_interval=0, eval_batches=1, log_interval=1000, progress=False, warmup_steps=2, device="cpu")
    cfg = load_config(base)
    vocab, seq = load_data(cfg.data).vocab_size, cfg.data.seq_len
    tokens_per_step = args.batch_size * seq
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.microbatches:
            compute = stage_compute(args.preset, vocab, seq, args.batch_size, args.batch_size // m, stages)
            ideal = max(compute)
            summary = run_pipeline(base, Path(tmp), f"gpipe-m{m}", schedule="gpipe", microbatches=m,
                                   microbatch_size=args.batch_size // m)
            measured = summary["median_step_time"]
            rows[m] = {"step_ms": round(measured * 1e3, 1), "ideal_ms": round(ideal * 1e3, 1),
                       "stage_compute_ms": [round(c * 1e3, 1) for c in compute],
                       "bubble_measured": round(1 - ideal / measured, 3),
                       "bubble_gpipe_formula": round((stages - 1) / (m + stages - 1), 3)}
            print(f"M={m}: step {measured * 1e3:.0f} ms, ideal {ideal * 1e3:.0f} ms, bubble "
                  f"{rows[m]['bubble_measured']:.2f} (formula {rows[m]['bubble_gpipe_formula']:.2f})", flush=True)
        m = max(args.microbatches)
        throughput = {}
        for schedule in ("gpipe", "1f1b"):
            summary = run_pipeline(base, Path(tmp), f"{schedule}-tps", schedule=schedule, microbatches=m,
                                   microbatch_size=args.batch_size // m)
            throughput[schedule] = tokens_per_step / summary["median_step_time"]
        baseline = train_baseline(load_config({**base, "microbatch_size": args.batch_size // m,
                                               "run_dir": Path(tmp) / "baseline"}))
        throughput["baseline"] = tokens_per_step / baseline["median_step_time"]
    print(f"tokens/s at M={m}: " + ", ".join(f"{k} {v:,.0f}" for k, v in throughput.items()), flush=True)
    print(json.dumps({
        "benchmark": "pipeline_bubble", "preset": args.preset, "stages": stages, "batch": [args.batch_size, seq],
        "threads_per_stage": 1, "baseline_threads": torch.get_num_threads(), "by_microbatches": rows,
        "tokens_per_s": {k: round(v, 1) for k, v in throughput.items()}, "tokens_per_s_at_microbatches": m,
        "ratio_1f1b_vs_gpipe": round(throughput["1f1b"] / throughput["gpipe"], 3),
        "ratio_gpipe_vs_baseline": round(throughput["gpipe"] / throughput["baseline"], 3),
    }))


if __name__ == "__main__":
    main()
