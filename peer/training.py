"""Pieces every trainer shares: device and precision, the optimizer and schedule, the run directory,
and a stop flag that SIGINT / SIGTERM set so a run ends cleanly between steps."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn

from peer.config import OptimConfig, RunConfig
from peer.errors import ConfigError
from peer.schedule import lr_at

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def limit_threads(threads: int) -> None:
    """``--threads``: torch's CPU threads for this process (0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """``--precision``: bf16 autocast anywhere under ``bf16``, on CUDA under ``auto``, never under ``fp32``."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where :func:`uses_bf16` says so; nothing otherwise."""
    if not uses_bf16(precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices and embeddings (dim >= 2), none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, o.lr, o.min_lr, o.warmup_steps, cfg.decay_steps) / o.lr
    )


def run_dir_for(cfg: RunConfig, command: str) -> tuple[str, Path, Path]:
    """(run id, run directory, checkpoint directory) for ``command``, with the documented defaults."""
    run_id = cfg.log.run_id or f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = cfg.log.run_dir or Path("runs") / run_id
    return run_id, Path(run_dir), Path(cfg.train.checkpoint_dir or Path(run_dir) / "checkpoints")


class StopFlag:
    """Set by SIGINT/SIGTERM (or by hand); trainers check it between steps and then save and exit.

    A second signal while stopping raises KeyboardInterrupt, for a user who really wants out.
    """

    def __init__(self):
        self._event = threading.Event()
        self.signal_name: str | None = None

    def set(self, name: str = "stop") -> None:
        self.signal_name = name
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, less if the flag is set meanwhile; returns whether it is set."""
        return self._event.wait(timeout)

    @contextlib.contextmanager
    def installed(self):
        """Route SIGINT and SIGTERM to this flag inside the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        owner = os.getpid()

        def handler(signum, _frame):
            if os.getpid() != owner:  # a child forked inside the block (hivemind's DHT process): default action
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            if self:
                raise KeyboardInterrupt
            self.set(signal.Signals(signum).name)
            logger.warning("%s received: stopping after this step (again to abort)", self.signal_name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def watch_parent(stop: StopFlag, interval: float = 1.0) -> None:
    """Set ``stop`` when this process's parent goes away (its launcher died): no orphans keep running."""
    parent = os.getppid()

    def loop():
        while not stop:
            if os.getppid() != parent:
                stop.set("parent exit")
                return
            time.sleep(interval)

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()
