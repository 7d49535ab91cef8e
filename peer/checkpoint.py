"""Checkpoints: one ``step-NNNNNNNN.pt`` file per save, written atomically and durably (each writer writes a
temporary file of its own, fsyncs it, renames it and fsyncs the directory; a failed write leaves no partial
file behind), the newest K kept.

A checkpoint is a plain dict (model, optimizer, scheduler, data position, RNG states,
step, and the fields that define the run) saved with ``torch.save``, holding only tensors, numpy arrays (numpy's
RNG state) and plain values: it is loaded with ``weights_only=True``, those numpy types allowed, so a planted file
cannot run code. :func:`load_latest` falls back to the
newest checkpoint that reads when a newer one is damaged (a crash mid-write on another filesystem, a full disk).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
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
# numpy arrays (plain data, no code): what numpy's RNG state holds
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed it
_NUMPY_ARRAYS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


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
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep``.

    :raises CheckpointError: it could not be written (a full disk, no directory); nothing partial is left
    """
    directory = Path(directory)
    path = directory / f"step-{step:08d}.pt"
    # a name of its own: the replicas of a stage may share a directory and save the same step at once
    tmp = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({**state, "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        _fsync_directory(directory)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else e.__context__  # torch's zip writer wraps a failed write
        if isinstance(cause, OSError):
            raise CheckpointError(f"cannot save checkpoint {path}: {cause.strerror or cause}") from None
        raise
    for _, old in checkpoint_steps(directory)[:-keep]:
        old.unlink(missing_ok=True)
    logger.info("saved checkpoint %s", path)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint in ``path``: tensors, numpy arrays and plain values only (``weights_only``: nothing in it runs).

    :raises CheckpointError: unreadable, damaged, or holding other objects (a file planted to run code)
    """
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused checkpoint {path}: it holds objects other than tensors and plain values, "
                              f"which loading would run ({_unpickler_problem(e)})") from None
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def _unpickler_problem(error: Exception) -> str:
    """What torch's weights-only unpickler refused (its "Unsupported global: ..." line), without its advice on how
    to load the file anyway or its terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"Unsupported global: (GLOBAL \S+|[^.]+)", text) or re.search(r"WeightsUnpickler error: ([^\n]+)",
                                                                                    text)
    return (found.group(1) if found else type(error).__name__)[:200]


def load_latest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that reads, with its path (older ones are tried when the newest
    is damaged or refused, each with a warning); None when there is none.

    :raises CheckpointError: there are checkpoints, and none of them reads
    """
    problems = []
    for _, path in reversed(checkpoint_steps(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping %s", e)
            problems.append(str(e))
    if problems:
        raise CheckpointError(f"no checkpoint in {directory} reads: {'; '.join(problems[:3])}")
    return None


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
