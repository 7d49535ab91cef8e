"""One stage of the static pipeline: a torch.distributed process running a GPipe or 1F1B schedule.

Every worker holds one stage of the same partition the swarm uses (``peer.partition``),
reads the same data stream as the baseline (so with equal seeds and batches the per-step
losses match the baseline's), and steps its own AdamW; the gradient norm is clipped
globally (squared norms all-reduced across stages). The last stage computes the loss and
logs the baseline's metrics. All workers stop together: a stop request (SIGINT/SIGTERM)
on any of them is all-reduced at the end of each step. A worker that fails writes its
cause to ``<run dir>/pipeline/stage-<k>.error`` and exits 1; the launcher then stops the rest.

    python -m peer.pipeline.worker --rank R --world S --master HOST:PORT --local-rank L --config FILE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from peer import checkpoint as ckpt
from peer.config import RunConfig
from peer.data import TrainStream, Windows, load_data, validation_batches
from peer.errors import CheckpointError
from peer.metrics import MetricsLog, StepTimer, eval_line, eval_record, peak_flops, perplexity, train_line, train_record
from peer.logs import setup_logging
from peer.model import count_parameters, flops_per_token
from peer.partition import build_stage, lm_loss
from peer.slowdown import idle_after_compute, mark
from peer.training import StopFlag, autocast, limit_threads, make_optimizer, make_scheduler, watch_parent

logger = logging.getLogger("peer.pipeline")
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class TimedStage(PipelineStage):
    """A :class:`PipelineStage` that counts the seconds its training forwards and backwards compute (``busy_s``)
    and, at ``slowdown`` F > 1, idles (F - 1) times each one's compute time after it, as a device F times slower
    would (``--compute-slowdown``; the idle counts as busy). The schedule's sends and receives are outside the
    timed calls (torch's ``forward_one_chunk`` / ``backward_one_chunk`` only read received buffers). The last
    stage's loss, which the schedule computes between them, is not timed; its backward is. On CUDA with F > 1
    each timed call waits for its kernels, so that the idle follows the device's time, not the launches' (at F = 1
    nothing waits, and ``busy_s`` is host time)."""

    def __init__(self, *args: Any, slowdown: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.slowdown, self.busy_s = slowdown, 0.0
        self.timed = True  # off during evaluation: validation is neither slowed nor counted

    def _timed(self, compute: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.timed:
            return compute(*args, **kwargs)
        started = mark()
        out = compute(*args, **kwargs)
        idle_after_compute(self.device, started, self.slowdown)
        self.busy_s += time.perf_counter() - started[0]
        return out

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(super().forward_one_chunk, *args, **kwargs)

    def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(super().backward_one_chunk, *args, **kwargs)


class Worker:
    def __init__(self, cfg: RunConfig, rank: int, world: int, local_rank: int, run_id: str, run_dir: Path,
                 ckpt_dir: Path, stop: StopFlag):
        t, d = cfg.train, cfg.data
        self.cfg, self.rank, self.world, self.stop = cfg, rank, world, stop
        self.first, self.last = rank == 0, rank == world - 1
        self.run_id, self.run_dir = run_id, run_dir
        self.ckpt_dir = ckpt_dir / f"stage-{rank}"
        cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu")
        self.microbatches = cfg.pipeline.microbatches or cfg.grad_accum
        if t.batch_size % self.microbatches:
            raise ValueError(f"batch_size {t.batch_size} is not divisible by {self.microbatches} microbatches")
        self.micro = t.batch_size // self.microbatches

        data = load_data(d)
        self.vocab_size, self.tokenizer = data.vocab_size, data.tokenizer.fingerprint
        self.module = build_stage(cfg.model.preset, data.vocab_size, d.seq_len, t.seed, rank, world,
                                  cfg.model.partition).to(self.device)
        self.stage = TimedStage(self.module, rank, world, self.device, slowdown=t.compute_slowdown)
        self.schedule = SCHEDULES[cfg.pipeline.schedule](self.stage, n_microbatches=self.microbatches,
                                                         loss_fn=lm_loss)
        self.optimizer = make_optimizer(self.module, cfg.optim, self.device)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.stream = TrainStream(Windows(data.train, d.seq_len), self.micro, t.seed)
        evals = self.microbatches * math.ceil(t.eval_batches / self.microbatches)
        self.val = validation_batches(Windows(data.validation, d.seq_len), self.micro, evals)
        self.identity = {"preset": cfg.model.preset, "dataset": d.dataset, "tokenizer": self.tokenizer,
                         "seq_len": d.seq_len, "seed": t.seed, "stages": world, "stage": rank}

    # ---- one step ----

    def _run(self, x, y, train: bool) -> list[torch.Tensor]:
        """Run the schedule on a whole batch; the last stage gets the microbatch losses."""
        losses: list[torch.Tensor] = []
        fn = self.schedule.step if train else self.schedule.eval
        self.stage.timed = train
        with autocast(self.device, self.cfg.train.precision):
            if self.first and self.last:
                fn(x.to(self.device), target=y.to(self.device), losses=losses)
            elif self.first:
                fn(x.to(self.device))
            elif self.last:
                fn(target=y.to(self.device), losses=losses)
            else:
                fn()
        return losses

    def _gather_busy(self) -> list[float]:
        """Every stage's busy seconds, in rank order (a collective: every rank calls it once, after the loop)."""
        mine = torch.tensor([self.stage.busy_s], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return [g.item() for g in gathered]

    def _batch(self):
        pairs = [self.stream.next() for _ in range(self.microbatches)]  # the baseline's micro-batches, in order
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def _clip(self) -> float:
        """Clip by the global gradient norm over all stages (as the baseline does over the whole model)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        local = torch.stack([g.detach().float().norm() for g in grads]).pow(2).sum() if grads else torch.zeros(())
        total = local.to(self.device)
        dist.all_reduce(total)
        norm = total.sqrt()
        max_norm = self.cfg.optim.grad_clip
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.device))
        return norm.item()

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @torch.no_grad()
    def evaluate(self) -> float | None:
        losses = []
        for i in range(0, len(self.val), self.microbatches):
            group = self.val[i : i + self.microbatches]
            if len(group) < self.microbatches:
                break
            out = self._run(torch.cat([g[0] for g in group]), torch.cat([g[1] for g in group]), train=False)
            losses += [loss.item() for loss in out]
        return sum(losses) / len(losses) if losses else None

    # ---- checkpoints ----

    def save(self, step: int) -> None:
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "data": self.stream.state_dict(),
                 "rng": ckpt.rng_state(), "identity": self.identity}
        ckpt.save_checkpoint(self.ckpt_dir, step, state, self.cfg.train.keep_checkpoints)

    def restore(self) -> int:
        steps = {s for s, _ in ckpt.checkpoint_steps(self.ckpt_dir)}
        latest = torch.tensor([max(steps) if steps else -1])
        dist.all_reduce(latest, op=dist.ReduceOp.MIN)
        common = int(latest.item())
        if not self.cfg.train.resume:
            if steps:
                raise CheckpointError(f"{self.ckpt_dir} already holds checkpoints; pass --resume, or a new --run-id")
            return 0
        if common < 0 or common not in steps:
            raise CheckpointError(f"--resume: stage {self.rank} has no checkpoint of the common step "
                                  f"in {self.ckpt_dir}")
        path = self.ckpt_dir / f"step-{common:08d}.pt"
        state = ckpt.load_checkpoint(path)
        ckpt.check_compatible(state.get("identity", {}), self.identity, path)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        return common

    # ---- the loop ----

    def _log_step(self, metrics: MetricsLog, step: int, start: int, loss: float, lr: float, grad_norm: float,
                  timer: StepTimer, flops: float, peak: float | None) -> None:
        """The last stage's metrics record and log line of a training step, every log interval, at the first step
        and at the last."""
        t = self.cfg.train
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        if step % self.cfg.log.log_interval == 0 or step == t.max_steps or step == start + 1:
            record = train_record(step, loss, lr, tokens_per_step, t.batch_size, timer.durations[-1],
                                  grad_norm=grad_norm)
            if peak is not None:
                record["mfu"] = flops * record["tokens_per_s"] / peak
            metrics.write(record)
            logger.info(train_line(record, t.max_steps))

    def train(self) -> dict | None:
        t, d = self.cfg.train, self.cfg.data
        start = step = self.restore()
        tokens_per_step = t.batch_size * d.seq_len
        metrics = None
        if self.last:
            metrics = MetricsLog(self.run_dir, self.run_id, self.cfg.log.wandb_project, self.cfg.log.wandb_mode,
                                 self.cfg.model_dump(mode="json"))
            logger.info("pipeline %s: %s in %d stages, %s, %d microbatches of %d, steps %d..%d, run dir %s",
                        self.run_id, self.cfg.model.preset, self.world, self.cfg.pipeline.schedule,
                        self.microbatches, self.micro, start + 1, t.max_steps, self.run_dir)
        timer, loss, val_loss, first_loss = StepTimer(), math.nan, None, None
        flops, peak = flops_per_token(self.cfg.model.preset, self.vocab_size, d.seq_len), peak_flops(self.device)
        saved = start if t.resume else None
        started = time.perf_counter()
        while step < t.max_steps:
            t0 = time.perf_counter()
            x, y = self._batch()
            losses = self._run(x, y, train=True)
            grad_norm = self._clip()
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            timer.add(time.perf_counter() - t0, tokens_per_step)
            if self.last:
                loss = sum(x.item() for x in losses) / len(losses)
                first_loss = loss if first_loss is None else first_loss
                self._log_step(metrics, step, start, loss, lr, grad_norm, timer, flops, peak)
            if (t.eval_interval and step % t.eval_interval == 0) or step == t.max_steps:
                val_loss = self.evaluate()
                if self.last and val_loss is not None:
                    record = eval_record(step, val_loss)
                    metrics.write(record)
                    logger.info(eval_line(record))
            if t.checkpoint_interval and step % t.checkpoint_interval == 0:
                self.save(step)
                saved = step
            if self._agree_to_stop():
                break
        train_time = time.perf_counter() - started
        if step > start and saved != step:
            self.save(step)
        stage_busy = self._gather_busy()  # every rank, before only the last goes on
        if not self.last:
            return None
        summary = {
            "kind": "summary", "command": "pipeline", "run_id": self.run_id, "run_dir": str(self.run_dir),
            "preset": self.cfg.model.preset, "stages": self.world, "schedule": self.cfg.pipeline.schedule,
            "microbatches": self.microbatches, "params_last_stage": count_parameters(self.module),
            "device": str(self.device), "steps": step, "start_step": start, "first_loss": first_loss,
            "final_loss": loss if step > start else None, "val_loss": val_loss,
            "val_ppl": perplexity(val_loss), "tokens": step * tokens_per_step,
            "tokens_per_s": timer.tokens_per_second, "median_step_time": timer.median_step_time,
            "train_time_s": train_time, "stopped_by": self.stop.signal_name if self.stop else None,
            "compute_slowdown": t.compute_slowdown, "stage_busy_s": [round(x, 2) for x in stage_busy],
        }
        metrics.write(summary)
        metrics.close()
        return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--local-rank", type=int, default=0)
    p.add_argument("--master", required=True, help="HOST:PORT of rank 0's rendezvous")
    p.add_argument("--config", type=Path, required=True, help="the run config as JSON (written by the launcher)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--checkpoint-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    setup_logging(debug=False)
    logging.getLogger("peer").setLevel(logging.INFO if args.rank == args.world - 1 else logging.WARNING)
    limit_threads(args.threads)
    error_file = args.run_dir / "pipeline" / f"stage-{args.rank}.error"
    stop = StopFlag()
    try:
        cfg = RunConfig.model_validate_json(args.config.read_text())
        backend = "nccl" if cfg.train.device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=args.rank, world_size=args.world, init_method=f"tcp://{args.master}",
                                timeout=datetime.timedelta(seconds=cfg.pipeline.dist_timeout))
        watch_parent(stop)
        with stop.installed():
            worker = Worker(cfg, args.rank, args.world, args.local_rank, args.run_id, args.run_dir,
                            args.checkpoint_dir, stop)
            summary = worker.train()
        if summary is not None:
            (args.run_dir / "pipeline" / "summary.json").write_text(json.dumps(summary))
        dist.destroy_process_group()
        return 0
    except BaseException as e:  # report the cause to the launcher, whatever it is
        cause = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__
        error_file.parent.mkdir(parents=True, exist_ok=True)
        error_file.write_text(cause + "\n\n" + traceback.format_exc())
        print(f"pipeline stage {args.rank}: {cause}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
