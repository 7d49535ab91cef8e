"""A stage peer's checkpoints: ``--checkpoint-dir``/``stage-K``, what a stage whose peers all went away
restarts from. A checkpoint holds the replica's :meth:`StageOptimizer.state_dict` and the identity it
must match to be loaded (the run's config fingerprint and the stage)."""

from __future__ import annotations

import logging
from pathlib import Path

from peer import checkpoint as ckpt
from peer.config import RunConfig

logger = logging.getLogger(__name__)


def stage_checkpoint_dir(cfg: RunConfig, stage: int) -> Path | None:
    base = cfg.train.checkpoint_dir
    return Path(base) / f"stage-{stage}" if base else None


def identity(stage: int, fingerprint: str) -> dict:
    """What a stage checkpoint must match to be loaded."""
    return {"fingerprint": fingerprint, "stage": stage}


def restore_stage(cfg: RunConfig, stage: int, optimizer, fingerprint: str = "") -> str:
    """Load the stage's own last checkpoint into ``optimizer`` (a :class:`StageOptimizer`) if there is one;
    returns where the state came from: ``checkpoint NAME``, or ``seed`` (nothing loaded)."""
    directory = stage_checkpoint_dir(cfg, stage)
    latest = ckpt.latest_checkpoint(directory) if directory else None
    if latest is None:
        return "seed"
    state = ckpt.load_checkpoint(latest)
    ckpt.check_compatible(state.get("identity", {}), identity(stage, fingerprint), latest)
    optimizer.load_state_dict(state)
    logger.info("stage %d: restored %s (epoch %d)", stage, latest, optimizer.epoch)
    return f"checkpoint {latest.name}"


def save_stage(cfg: RunConfig, stage: int, optimizer, fingerprint: str) -> None:
    """Save ``optimizer``'s state (when ``--checkpoint-dir`` is set), keeping the last ``--keep-checkpoints``."""
    directory = stage_checkpoint_dir(cfg, stage)
    if directory is not None:
        state = {**optimizer.state_dict(), "identity": identity(stage, fingerprint)}
        ckpt.save_checkpoint(directory, optimizer.epoch, state, cfg.train.keep_checkpoints)
