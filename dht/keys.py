"""DHT key names of a run.

hivemind's :class:`~hivemind.dht.schema.SchemaValidator` maps each schema field to the
key ``{prefix}_{field}``; with the run id as the prefix, a run's keys are
``{run}_stage_{k}`` (one per pipeline stage, a dictionary of peer records by owner
subkey), ``{run}_digests_{k}`` (each replica's parameter digest, by the same owner subkeys),
``{run}_config`` (the run's config record), ``{run}_trainers`` (trainers' counters) and
``{run}_revoked`` (revoked invitations). Plain
strings, no hivemind import, so that pure code (policies, the simulator) can name keys too.
"""

from __future__ import annotations

import re

MAX_STAGES = 64
"""Stage keys the schema knows: ``stage_0`` ... ``stage_63`` (the config allows up to 64 stages)."""

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id or ""):
        raise ValueError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '_', '.', '-'")
    return run_id


def stage_field(stage: int) -> str:
    """Schema field of a stage (the key without the run prefix)."""
    if not 0 <= stage < MAX_STAGES:
        raise ValueError(f"stage {stage} is out of range 0..{MAX_STAGES - 1}")
    return f"stage_{stage}"


CONFIG_FIELD = "config"
TRAINERS_FIELD = "trainers"
REVOKED_FIELD = "revoked"


def digests_field(stage: int) -> str:
    """Schema field of a stage's parameter digests."""
    stage_field(stage)  # the same range check
    return f"digests_{stage}"


def stage_key(run_id: str, stage: int) -> str:
    """``{run}_stage_{k}``: the records of the peers that serve stage ``k``."""
    return f"{run_id}_{stage_field(stage)}"


def digests_key(run_id: str, stage: int) -> str:
    """``{run}_digests_{k}``: each replica of stage ``k`` publishes its epoch and parameter digest here."""
    return f"{run_id}_{digests_field(stage)}"


def config_key(run_id: str) -> str:
    """``{run}_config``: the run's model/training config and its hash."""
    return f"{run_id}_{CONFIG_FIELD}"


def trainers_key(run_id: str) -> str:
    """``{run}_trainers``: the trainers' progress and fault counters."""
    return f"{run_id}_{TRAINERS_FIELD}"


def revoked_key(run_id: str) -> str:
    """``{run}_revoked``: the owner's lists of revoked invitations (``dht.admission``)."""
    return f"{run_id}_{REVOKED_FIELD}"
