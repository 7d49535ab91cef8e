"""Metrics: a JSONL file in the run directory, optional Weights & Biases, compact console lines.

Every record is one JSON object with a ``kind`` ("train", "eval", "summary", ...) and a
``step``; the same records go to W&B (offline unless the user asks for online), so runs
can be compared with or without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of the device name, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
                   "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak bf16 FLOP/s if it is a GPU we know, else None (no MFU on CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsLog:
    """Writes records to ``<run_dir>/metrics.jsonl`` and, with a project name, to W&B."""

    def __init__(self, run_dir: Path, run_id: str, wandb_project: str | None, wandb_mode: str, config: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self._wandb = None
        if wandb_project and wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(
                project=wandb_project, name=run_id, dir=str(self.run_dir), mode=wandb_mode, config=config,
                resume="allow", id=run_id,
            )
            logger.info("W&B %s run %s in %s", wandb_mode, run_id, self.run_dir / "wandb")

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            kind = record.get("kind", "train")
            values = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self._wandb.log(values, step=record.get("step"))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class StepTimer:
    """Per-step wall times and the tokens they processed; the first ``warmup`` steps are not counted."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.durations: list[float] = []
        self.tokens_per_step: list[int] = []

    def add(self, seconds: float, tokens: int) -> None:
        self.durations.append(seconds)
        self.tokens_per_step.append(tokens)

    def _counted(self) -> list[float]:
        return self.durations[self.warmup :] if len(self.durations) > self.warmup else self.durations

    @property
    def median_step_time(self) -> float:
        counted = self._counted()
        return statistics.median(counted) if counted else math.nan

    @property
    def tokens_per_second(self) -> float:
        """Median-step throughput: robust to the odd slow step on a noisy machine."""
        counted = self._counted()
        if not counted:
            return math.nan
        return statistics.median(self.tokens_per_step) / statistics.median(counted)


MAX_LOG_PPL = 50.0
"""Perplexity is reported as exp(min(loss, 50)): a diverged run still writes a finite number (e^50 ~ 5e21)."""


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)`` capped at ``exp(MAX_LOG_PPL)``; None without a finite loss."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, MAX_LOG_PPL))


def train_record(step: int, loss: float, lr: float, tokens_per_step: int, batch_size: int, step_time: float,
                 tokens_per_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """The ``train`` record every trainer (baseline, pipeline, swarm) writes for a logged step.

    :param tokens_per_s: the throughput to report; by default this step's (``tokens_per_step / step_time``)
    :param extra: trainer-specific fields (``grad_norm``, ``mfu``, the swarm's retries and peers, ...)
    """
    return {"kind": "train", "step": step, "loss": loss, "ppl": perplexity(loss), "lr": lr,
            "tokens": step * tokens_per_step, "examples": step * batch_size,
            "tokens_per_s": tokens_per_step / step_time if tokens_per_s is None else tokens_per_s,
            "step_time": step_time, **extra}


def eval_record(step: int, val_loss: float) -> dict[str, Any]:
    """The ``eval`` record: validation loss and perplexity after ``step``."""
    return {"kind": "eval", "step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)}


def human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def train_line(r: dict[str, Any], max_steps: int) -> str:
    line = (
        f"step {r['step']:>{len(str(max_steps))}}/{max_steps} | loss {r['loss']:.4f} | ppl {r['ppl']:.1f} | "
        f"lr {r['lr']:.2e} | gnorm {r['grad_norm']:.2f} | {human(r['tokens_per_s'])} tok/s | "
        f"{r['step_time'] * 1000:.0f} ms/step"
    )
    if r.get("mfu") is not None:
        line += f" | mfu {100 * r['mfu']:.1f}%"
    return line


def eval_line(r: dict[str, Any]) -> str:
    return f"eval step {r['step']} | val loss {r['val_loss']:.4f} | val ppl {r['val_ppl']:.1f}"


def stage_batches(summaries: list[dict]) -> dict[int, list[int]]:
    """Samples per optimizer step, per stage, from stage peers' ``join`` summaries (``step_samples``: each
    replica's [epoch, samples] per step): a step's batch is the sum over the replicas that took part."""
    per: dict[int, dict[int, int]] = {}
    for summary in summaries:
        epochs = per.setdefault(summary["stage"], {})
        for epoch, samples in summary.get("step_samples", []):
            epochs[epoch] = epochs.get(epoch, 0) + samples
    return {stage: [epochs[e] for e in sorted(epochs)] for stage, epochs in sorted(per.items())}

