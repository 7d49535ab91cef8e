"""The single-process baseline trainer: the whole model on one device, plain PyTorch.

This is what SWARM and the static pipeline are judged against, so it is kept minimal
and fast: gradient accumulation over micro-batches, AdamW with a warmup + cosine
schedule, gradient clipping, optional bf16 autocast, periodic validation, checkpoints
that resume exactly, and metrics to the console, a JSONL file and W&B.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from peer import checkpoint as ckpt
from peer.config import RunConfig
from peer.data import TrainStream, Windows, load_data, validation_batches
from peer.errors import CheckpointError
from peer.metrics import MetricsLog, StepTimer, eval_line, eval_record, peak_flops, perplexity, train_line, train_record
from peer.model import count_parameters, flops_per_token
from peer.partition import build_stage, lm_loss
from peer.slowdown import idle_after_compute, mark
from peer.training import (
    StopFlag, autocast, limit_threads, make_optimizer, make_scheduler, resolve_device, run_dir_for,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model, batches, device, precision) -> float:
    """Mean loss over the fixed validation micro-batches."""
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, precision):
            losses.append(lm_loss(model(x.to(device)), y.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def train_baseline(cfg: RunConfig, stop: StopFlag | None = None) -> dict[str, Any]:
    """Train for ``cfg.train.max_steps`` steps (or until ``stop`` is set); return the run summary."""
    stop = stop if stop is not None else StopFlag()
    t, o, d = cfg.train, cfg.optim, cfg.data
    limit_threads(t.threads)
    device = resolve_device(t.device)
    run_id, run_dir, ckpt_dir = run_dir_for(cfg, "baseline")

    data = load_data(d)
    model = build_stage(cfg.model.preset, data.vocab_size, d.seq_len, t.seed, stage=0, num_stages=1).to(device)
    optimizer = make_optimizer(model, o, device)
    scheduler = make_scheduler(optimizer, cfg)
    stream = TrainStream(Windows(data.train, d.seq_len), t.microbatch_size, t.seed)
    val_batches = validation_batches(Windows(data.validation, d.seq_len), t.microbatch_size, t.eval_batches)
    identity = {"preset": cfg.model.preset, "dataset": d.dataset, "tokenizer": data.tokenizer.fingerprint,
                "seq_len": d.seq_len, "seed": t.seed}

    start_step = _restore_or_refuse(cfg, ckpt_dir, identity, model, optimizer, scheduler, stream)
    n_params = count_parameters(model)
    tokens_per_step = t.batch_size * d.seq_len
    flops_token, peak = flops_per_token(cfg.model.preset, data.vocab_size, d.seq_len), peak_flops(device)
    metrics = MetricsLog(run_dir, run_id, cfg.log.wandb_project, cfg.log.wandb_mode, cfg.model_dump(mode="json"))
    logger.info(
        "baseline %s: %s (%.2fM params) on %s, %d x %d-token sequences per step (%d micro-batches of %d), "
        "steps %d..%d, run dir %s",
        run_id, cfg.model.preset, n_params / 1e6, device, t.batch_size, d.seq_len, cfg.grad_accum,
        t.microbatch_size, start_step + 1, t.max_steps, run_dir,
    )

    timer, step, loss, val_loss = StepTimer(), start_step, math.nan, None
    first_loss = None
    last_saved = start_step if t.resume else None

    def save():
        nonlocal last_saved
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "data": stream.state_dict(), "rng": ckpt.rng_state(),
                 "identity": identity, "config": cfg.model_dump(mode="json")}
        ckpt.save_checkpoint(ckpt_dir, step, state, t.keep_checkpoints)
        last_saved = step

    bar = tqdm(total=t.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if cfg.log.progress else True, leave=False)  # None: only on a terminal
    started = time.perf_counter()
    with logging_redirect_tqdm():
        while step < t.max_steps and not stop:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                x, y = stream.next()  # (micro, T) int64 each
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                computed = mark()
                with autocast(device, t.precision):
                    micro_loss = lm_loss(model(x), y)
                (micro_loss / cfg.grad_accum).backward()
                loss_sum += micro_loss.detach()
                idle_after_compute(device, computed, t.compute_slowdown)  # --compute-slowdown
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            timer.add(time.perf_counter() - t0, tokens_per_step)
            bar.update(1)

            if step % cfg.log.log_interval == 0 or step == t.max_steps or step == start_step + 1:
                loss = loss_sum.item() / cfg.grad_accum
                first_loss = loss if first_loss is None else first_loss
                step_time = timer.durations[-1]
                record = train_record(step, loss, lr, tokens_per_step, t.batch_size, step_time,
                                      grad_norm=grad_norm.item())
                if peak is not None:
                    record["mfu"] = flops_token * record["tokens_per_s"] / peak
                metrics.write(record)
                bar.set_postfix(loss=f"{loss:.3f}")
                logger.info(train_line(record, t.max_steps))
            if (t.eval_interval and step % t.eval_interval == 0) or step == t.max_steps:
                val_loss = evaluate(model, val_batches, device, t.precision)
                record = eval_record(step, val_loss)
                metrics.write(record)
                logger.info(eval_line(record))
            if t.checkpoint_interval and step % t.checkpoint_interval == 0:
                save()
    bar.close()
    train_time = time.perf_counter() - started
    if step > start_step and last_saved != step:
        save()
    if stop:
        logger.warning("stopped by %s at step %d; resume with --resume --run-id %s", stop.signal_name, step, run_id)

    summary = {
        "kind": "summary", "command": "baseline", "run_id": run_id, "run_dir": str(run_dir),
        "preset": cfg.model.preset, "params": n_params, "device": str(device), "steps": step,
        "start_step": start_step, "first_loss": first_loss, "final_loss": loss if step > start_step else None,
        "val_loss": val_loss, "val_ppl": perplexity(val_loss),
        "tokens": step * tokens_per_step, "tokens_per_s": timer.tokens_per_second,
        "median_step_time": timer.median_step_time, "train_time_s": train_time,
        "compute_slowdown": t.compute_slowdown, "stopped_by": stop.signal_name if stop else None,
        "checkpoint": str(ckpt.latest_checkpoint(ckpt_dir)) if last_saved is not None else None,
    }
    metrics.write(summary)
    metrics.close()
    return summary


def _restore_or_refuse(cfg, ckpt_dir, identity, model, optimizer, scheduler, stream) -> int:
    """Load the latest checkpoint under ``--resume``; refuse to start over on top of one without it."""
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if not cfg.train.resume:
        if latest is not None:
            raise CheckpointError(
                f"{ckpt_dir} already holds a checkpoint ({latest.name}); pass --resume to continue that run, "
                "or a new --run-id to start another"
            )
        return 0
    if latest is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
    latest, state = ckpt.load_latest(ckpt_dir)  # the newest that reads
    ckpt.check_compatible(state.get("identity", {}), identity, latest)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    ckpt.set_rng_state(state["rng"])
    logger.info("resumed from %s (step %d)", latest, state["step"])
    return int(state["step"])
