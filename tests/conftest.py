"""Shared fixtures: a per-session cache directory (tokenizer, token streams), the loaded corpus,
and small configurations that train in seconds on two CPU cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from peer.config import load_config

pytest_plugins = ["swarm_fixtures"]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """All tokenizers and token caches of the test session live in one fresh directory."""
    cache = tmp_path_factory.mktemp("swarm-cache")
    os.environ["SWARM_CACHE_DIR"] = str(cache)
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def corpus(session_cache):
    from peer.data import load_data

    return load_data(load_config().data)


def train_steps(metrics: Path) -> int:
    """Training records in a run's ``metrics.jsonl`` so far (0 before the file exists)."""
    return metrics.read_text().count('"kind": "train"') if metrics.exists() else 0


def tiny_config(run_dir: Path, **overrides):
    """A `tiny` run that learns fast: short warmup, high learning rate, no progress bar."""
    fields = dict(preset="tiny", max_steps=10, warmup_steps=2, lr=3e-3, min_lr=3e-4, log_interval=1,
                  eval_interval=0, eval_batches=2, run_dir=run_dir, progress=False)
    fields.update(overrides)
    return load_config(fields)
