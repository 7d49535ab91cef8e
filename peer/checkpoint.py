"""Checkpoints: one ``step-NNNNNNNN.pt`` file per save, written atomically (also by several writers at
once: each writes a temporary file of its own, then renames it), the newest K kept.

A checkpoint is a plain dict (model, optimizer, scheduler, data position, RNG states,
step, and the fields that define the run) saved with ``torch.save``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer.errors import CheckpointError

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_steps(directory: Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    steps = checkpoint_steps(directory)
    return steps[-1][1] if steps else None


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    # a name of its own: the replicas of a stage may share a directory and save the same step at once
    tmp = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    torch.save({**state, "step": step}, tmp)
    tmp.replace(path)
    for _, old in checkpoint_steps(directory)[:-keep]:
        old.unlink(missing_ok=True)
    logger.info("saved checkpoint %s", path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint whose run-defining fields differ from the current run's."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from a different run ({'; '.join(diffs)})")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
