"""How fast this peer runs its stage: forward+backward samples/s for the run's microbatch shape.

Measured once per (device, stage config, dtype) and cached in ``<cache dir>/throughput.json``
under a file lock (which also keeps two peers on one machine from measuring at the same
time and slowing each other down). ``--throughput auto`` reuses the cache, ``eval``
measures again, a number is announced as is. That figure is the prior; once the peer serves,
:class:`LiveThroughput` measures what it really does (announced as ``throughput_ema``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from peer.config import RunConfig
from peer.errors import SwarmError
from peer.partition import build_stage, lm_loss
from peer.training import autocast, resolve_device, uses_bf16

logger = logging.getLogger(__name__)

CACHE_FILE = "throughput.json"
LOCK_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class StageShape:
    """What the measurement depends on besides the device: the stage and the microbatch."""

    preset: str
    vocab_size: int
    seq_len: int
    stage: int
    num_stages: int
    microbatch_size: int
    seed: int = 0  # weights do not change the speed; kept out of the cache key
    partition: str = "even"

    @classmethod
    def from_config(cls, cfg: RunConfig, stage: int, vocab_size: int | None = None) -> "StageShape":
        return cls(cfg.model.preset, vocab_size or cfg.data.vocab_size, cfg.data.seq_len, stage,
                   cfg.model.stages, cfg.train.microbatch_size, cfg.train.seed, cfg.model.partition)

    def cache_fields(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields.pop("seed")
        return fields


@dataclasses.dataclass(frozen=True)
class Throughput:
    samples_per_s: float
    source: str  # "measured", "cache" or "override"


def device_name(device: torch.device) -> str:
    """A name that identifies the hardware: the GPU model, or the CPU and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu} x{torch.get_num_threads()}"


def measure_stage(shape: StageShape, device: torch.device, precision: str = "auto", warmup: int = 2,
                  min_steps: int = 3, min_seconds: float = 1.0, max_steps: int = 100) -> float:
    """Forward+backward samples/s of one stage on ``device``: ``warmup`` untimed steps, then timed
    steps until both ``min_steps`` and ``min_seconds`` are reached (at most ``max_steps``)."""
    module = build_stage(shape.preset, shape.vocab_size, shape.seq_len, shape.seed, shape.stage, shape.num_stages,
                         shape.partition)
    module.to(device).train()
    in_shape, in_dtype = module.input_spec(shape.microbatch_size, shape.seq_len)
    generator = torch.Generator(device="cpu").manual_seed(0)
    if in_dtype == torch.long:
        x = torch.randint(0, shape.vocab_size, in_shape, generator=generator).to(device)  # (B, T) token ids
    else:
        x = torch.randn(in_shape, generator=generator).to(device).requires_grad_(True)  # (B, T, H) activations
    targets = torch.randint(0, shape.vocab_size, (shape.microbatch_size, shape.seq_len), generator=generator).to(device)

    def step() -> None:
        with autocast(device, precision):
            out = module(x)  # (B, T, H) hidden states, or (B, T, V) logits from the last stage
        if module.is_last:
            lm_loss(out, targets).backward()
        else:
            out.backward(torch.ones_like(out))  # stands in for the gradient that comes back from downstream
        module.zero_grad(set_to_none=True)
        if x.grad is not None:
            x.grad = None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    steps, start = 0, time.perf_counter()
    while steps < max_steps and (steps < min_steps or time.perf_counter() - start < min_seconds):
        step()
        steps += 1
        if steps >= min_steps:
            sync()
    sync()
    elapsed = time.perf_counter() - start
    return shape.microbatch_size * steps / elapsed


def stage_throughput(setting: str, shape: StageShape, device: torch.device, precision: str, cache_dir: Path,
                     **measure_kwargs: Any) -> Throughput:
    """The samples/s to announce, by ``--throughput`` setting: a number, ``auto`` (cache) or ``eval``.

    :raises SwarmError: the cache is locked by another process for too long
    """
    if setting not in ("auto", "eval"):
        return Throughput(float(setting), "override")
    dtype = "bf16" if uses_bf16(precision, device) else "fp32"
    key = json.dumps({"device": device_name(device), "dtype": dtype, **shape.cache_fields()},
                     sort_keys=True)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / CACHE_FILE
    try:
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            cache = _read_cache(path)
            if setting == "auto" and key in cache:
                logger.info("throughput of stage %d from the cache: %.1f samples/s", shape.stage,
                            cache[key]["samples_per_s"])
                return Throughput(cache[key]["samples_per_s"], "cache")
            value = measure_stage(shape, device, precision, **measure_kwargs)
            cache[key] = {"samples_per_s": value, "measured_at": time.time()}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(path)
    except Timeout:
        raise SwarmError(f"the throughput cache {path} stayed locked for {LOCK_TIMEOUT_S:.0f} s; is another peer "
                         f"measuring? Pass --throughput <samples/s> to skip the measurement") from None
    logger.info("measured stage %d: %.1f samples/s (%s, microbatch %d x %d)", shape.stage, value, device_name(device),
                shape.microbatch_size, shape.seq_len)
    return Throughput(value, "measured")


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        logger.warning("ignoring an unreadable throughput cache %s", path)
        return {}


def throughput_for(cfg: RunConfig, stage: int, vocab_size: int | None = None) -> Throughput:
    """:func:`stage_throughput` for a run config (``--throughput``, ``--device``, ``--precision``, ``--cache-dir``)."""
    device = resolve_device(cfg.train.device)
    measured = stage_throughput(cfg.peer.throughput, StageShape.from_config(cfg, stage, vocab_size), device,
                                cfg.train.precision, cfg.data.cache_dir)
    slowdown = cfg.train.compute_slowdown
    if slowdown > 1.0 and measured.source != "override":  # the device it emulates is that much slower
        return Throughput(measured.samples_per_s / slowdown, f"{measured.source}, slowed down {slowdown:g}x")
    return measured


class LiveThroughput:
    """The samples/s a peer really serves: samples trained per second its compute worker was busy (forward
    and backward jobs), an exponential moving average over windows of at least ``min_busy_s`` busy seconds.
    Idle time (no traffic) does not lower it; a slower device (or ``--compute-slowdown``) does.

    :param alpha: weight of a new window in the average
    """

    def __init__(self, alpha: float = 0.3, min_busy_s: float = 1.0):
        self.alpha, self.min_busy_s = alpha, min_busy_s
        self.ema: float | None = None
        self._samples, self._busy = 0, 0.0

    def update(self, samples_total: int, busy_total_s: float) -> float | None:
        """Feed the running totals; returns the average (None before the first full window)."""
        samples, busy = samples_total - self._samples, busy_total_s - self._busy
        if busy >= self.min_busy_s and samples > 0:
            rate = samples / busy
            self.ema = rate if self.ema is None else (1 - self.alpha) * self.ema + self.alpha * rate
            self._samples, self._busy = samples_total, busy_total_s
        return self.ema
