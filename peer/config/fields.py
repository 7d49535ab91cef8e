"""What follows from a field's name: its section, flag, environment variable and the commands that take it."""

from __future__ import annotations

import typing
from typing import Any

from pydantic.fields import FieldInfo

from peer.config.sections import COMMAND_DEFAULTS, COMMANDS, FIELD_SECTION, SECTIONS, SWARM_RUN, OptimConfig

ENV_PREFIX = "SWARM_"


def is_list_field(field: str) -> bool:
    return typing.get_origin(field_info(field).annotation) is list


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def field_info(field: str) -> FieldInfo:
    return SECTIONS[FIELD_SECTION[field]].model_fields[field]


def nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"max_steps": 5}`` -> ``{"train": {"max_steps": 5}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        out.setdefault(FIELD_SECTION[key], {})[key] = value
    return out


def field_commands(field: str) -> tuple[str, ...]:
    """The sub-commands that take ``field`` as a flag."""
    extra = field_info(field).json_schema_extra
    return extra["commands"] if isinstance(extra, dict) else SECTIONS[FIELD_SECTION[field]].commands


def command_fields(command: str) -> list[str]:
    """The config fields ``command`` takes as flags, in section order."""
    assert command in COMMANDS, command
    return [name for name in FIELD_SECTION if command in field_commands(name)]


SHARED_FIELDS = (
    "preset", "stages", "partition",
    "vocab_size", "seq_len", "val_fraction",
    *OptimConfig.model_fields,
    "max_steps", "batch_size", "microbatch_size", "seed",
)
"""Fields every peer of a swarm run must agree on: the run's config record and its hash cover exactly these. Not
`dataset` or `tokenizer`: a record from the network never names a local file or a Hub repository (trainers check
the run's tokenizer by its fingerprint instead)."""
assert all(set(SWARM_RUN) <= set(field_commands(f)) for f in SHARED_FIELDS), "swarm commands take the shared fields"
assert all(set(d) <= set(command_fields(c)) for c, d in COMMAND_DEFAULTS.items()), "a command default is a flag of it"
