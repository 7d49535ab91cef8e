"""Overhead of `swarm-peer baseline` over a bare PyTorch training loop.

Both train the same preset from the same seed on the same training windows with the
same batch (micro-batches accumulated to the global batch), AdamW and gradient
clipping. The baseline runs through its real entry point (data stream, schedule,
metrics, JSONL, final checkpoint); the bare loop is the ~30 lines below. Rounds
alternate between the two so that machine noise hits both; the figure is the ratio of
median step times. Last line: a JSON object.

    python benchmarks/baseline_overhead.py [--preset llama-14m] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from peer.baseline import train_baseline
from peer.config import load_config
from peer.data import TrainStream, Windows, load_data
from peer.partition import build_stage, lm_loss
from peer.training import resolve_device


def bare_loop(cfg, data, steps: int, device: torch.device) -> list[float]:
    """The minimal loop: same model, same micro-batches, AdamW, clipping. Returns per-step seconds."""
    t, d = cfg.train, cfg.data
    model = build_stage(cfg.model.preset, data.vocab_size, d.seq_len, t.seed, 0, 1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stream = TrainStream(Windows(data.train, d.seq_len), t.microbatch_size, t.seed)
    accum = cfg.grad_accum
    batches = [[stream.next() for _ in range(accum)] for _ in range(steps)]  # data tensors prepared up front
    times = []
    for micro_batches in batches:
        t0 = time.perf_counter()
        for x, y in micro_batches:
            loss = lm_loss(model(x.to(device)), y.to(device))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-14m")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warmup = 2

    with tempfile.TemporaryDirectory() as tmp:
        base = dict(preset=args.preset, max_steps=args.steps + warmup, device=args.device, eval_interval=0,
                    eval_batches=1, log_interval=10, progress=False, warmup_steps=2)
        cfg = load_config(base)
        device = resolve_device(cfg.train.device)
        data = load_data(cfg.data)
        baseline_steps, bare_steps = [], []
        for r in range(args.rounds):
            summary = train_baseline(load_config({**base, "run_dir": Path(tmp) / f"round{r}"}))
            baseline_steps.append(summary["median_step_time"])
            bare_steps.append(statistics.median(bare_loop(cfg, data, args.steps + warmup, device)[warmup:]))
            print(f"round {r}: baseline {baseline_steps[-1] * 1e3:.1f} ms/step, "
                  f"bare {bare_steps[-1] * 1e3:.1f} ms/step")

    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    baseline_step, bare_step = statistics.median(baseline_steps), statistics.median(bare_steps)
    result = {
        "benchmark": "baseline_overhead",
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "tokens_per_step": tokens_per_step,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "baseline_ms_per_step": round(baseline_step * 1e3, 2),
        "bare_ms_per_step": round(bare_step * 1e3, 2),
        "baseline_tokens_per_s": round(tokens_per_step / baseline_step, 1),
        "bare_tokens_per_s": round(tokens_per_step / bare_step, 1),
        "ratio": round(bare_step / baseline_step, 4),
        "target_ratio": 0.95,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
