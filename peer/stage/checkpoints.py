"""A stage peer's checkpoints: ``--checkpoint-dir``/``stage-K``, what a stage whose peers all went away
restarts from. A checkpoint holds the replica's :meth:`StageOptimizer.state_dict` and the identity it
must match to be loaded (the run's config fingerprint and the stage)."""

from __future__ import annotations

import logging
from pathlib import Path

from peer import checkpoint as ckpt
from peer.config import RunConfig
from peer.errors import CheckpointError

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
    found = ckpt.load_latest(directory) if directory else None  # the newest that reads
    if found is None:
        return "seed"
    latest, state = found
    ckpt.check_compatible(state.get("identity", {}), identity(stage, fingerprint), latest)
    optimizer.load_state_dict(state)
    logger.info("stage %d: restored %s (epoch %d)", stage, latest, optimizer.epoch)
    return f"checkpoint {latest.name}"


def save_stage(cfg: RunConfig, stage: int, optimizer, fingerprint: str) -> None:
    """Save ``optimizer``'s state (when ``--checkpoint-dir`` is set), keeping the last ``--keep-checkpoints``.

    A save that fails (a full disk, a directory gone) is logged: the peer keeps serving, and its next periodic save
    tries again."""
    directory = stage_checkpoint_dir(cfg, stage)
    if directory is None:
        return
    state = {**optimizer.state_dict(), "identity": identity(stage, fingerprint)}
    try:
        ckpt.save_checkpoint(directory, optimizer.epoch, state, cfg.train.keep_checkpoints)
    except CheckpointError as e:
        logger.warning("stage %d: %s; serving on, the next save tries again", stage, e)
