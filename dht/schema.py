"""The storage-side schema: pydantic.v1 models for hivemind's ``SchemaValidator``, derived from
the v2 records of :mod:`dht.records` so that the layout is written down only once.

hivemind 1.1.12 validates with pydantic.v1 and rejects a record when parsing changed it
(``parsed != raw``), which is why every derived type is strict (``3`` is not a float,
``"3"`` is not an int). Two more choices keep old and new peers interoperable:

* the derived record models allow extra fields (a newer peer's additions are stored);
* they serialise back only the fields that were present (``exclude_unset``), so a record
  from an older peer that lacks a later, defaulted field still compares equal.

The run schema has one field per stage key (``stage_0`` ... ``stage_63``), each a
dictionary ``{owner public key subkey: PeerRecord}``, ``digests_0`` ... ``digests_63`` and ``config``
``trainers`` and ``revoked`` of the same shape with :class:`DigestRecord`, :class:`RunConfigRecord`,
:class:`TrainerRecord` and :class:`RevocationRecord` values; the run id is the key prefix.
"""

from __future__ import annotations

import enum
import functools
import types
import typing
from typing import Any, Dict, Literal, Optional

import annotated_types
import pydantic
import pydantic.v1 as v1
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator

from dht.keys import (CONFIG_FIELD, MAX_STAGES, REVOKED_FIELD, TRAINERS_FIELD, check_run_id, digests_field,
                      stage_field)
from dht.records import DigestRecord, PeerRecord, RevocationRecord, RunConfigRecord, TrainerRecord


class _PresentFieldsOnly(v1.BaseModel):
    """Base of the derived models: keep unknown fields, and dump only what was given."""

    class Config:
        extra = v1.Extra.allow

    def dict(self, **kwargs):  # noqa: A003 - pydantic.v1 API
        kwargs["exclude_unset"] = True
        return super().dict(**kwargs)


def _constraints(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = {annotated_types.Ge: "ge", annotated_types.Gt: "gt", annotated_types.Le: "le", annotated_types.Lt: "lt",
             annotated_types.MinLen: "min_length", annotated_types.MaxLen: "max_length"}
    for item in metadata:
        for cls, name in names.items():
            if isinstance(item, cls):
                out[name] = getattr(item, name)
        if getattr(item, "pattern", None):
            out["regex"] = item.pattern
    return out


def _strict_type(annotation: Any, constraints: dict[str, Any]) -> Any:
    """The strict pydantic.v1 type of a v2 annotation (the subset the records use)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[_strict_type(inner, constraints)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return Literal[tuple(member.value for member in annotation)]
    if annotation is bool:
        return v1.StrictBool
    if annotation is int:
        return v1.conint(strict=True, **constraints)
    if annotation is float:
        return v1.confloat(strict=True, **constraints)
    if annotation is str:
        return v1.constr(strict=True, **constraints)
    if origin is dict:
        return Dict[v1.StrictStr, Any]
    if origin is list and args == (float,):
        return v1.conlist(v1.StrictFloat, max_items=constraints.get("max_length"))
    if origin is list and args == (str,):
        return v1.conlist(v1.constr(strict=True, max_length=64), max_items=constraints.get("max_length"))
    raise TypeError(f"no strict pydantic.v1 type for {annotation!r}; extend dht.schema._strict_type")


@functools.cache
def derive_v1(model: type[pydantic.BaseModel]) -> type[v1.BaseModel]:
    """A strict pydantic.v1 twin of a v2 record model: same fields, defaults and bounds."""
    fields = {}
    for name, info in model.model_fields.items():
        field_type = _strict_type(info.annotation, _constraints(info.metadata))
        default = info.default.value if isinstance(info.default, enum.Enum) else info.default
        fields[name] = (field_type, ... if info.is_required() else default)
    return v1.create_model(f"{model.__name__}V1", __base__=_PresentFieldsOnly, **fields)


@functools.cache
def run_schema() -> type[v1.BaseModel]:
    """The schema of one run's keys (the run id is applied as the validator's prefix)."""
    # Required and not Optional: a plain ``None`` stored under a stage key with a far expiration would
    # otherwise pass and block every subkey write to that key. (SchemaValidator relaxes "required" itself.)
    peer_dict = Dict[BytesWithPublicKey, derive_v1(PeerRecord)]
    fields: dict[str, Any] = {stage_field(k): (peer_dict, ...) for k in range(MAX_STAGES)}
    digests = Dict[BytesWithPublicKey, derive_v1(DigestRecord)]
    fields.update({digests_field(k): (digests, ...) for k in range(MAX_STAGES)})
    fields[CONFIG_FIELD] = (Dict[BytesWithPublicKey, derive_v1(RunConfigRecord)], ...)
    fields[TRAINERS_FIELD] = (Dict[BytesWithPublicKey, derive_v1(TrainerRecord)], ...)
    fields[REVOKED_FIELD] = (Dict[BytesWithPublicKey, derive_v1(RevocationRecord)], ...)
    return v1.create_model("SwarmRunSchema", **fields)


def schema_validator(run_id: str) -> SchemaValidator:
    """hivemind ``SchemaValidator`` for ``{run_id}_stage_{k}``, ``_config`` and ``_trainers``; other keys pass."""
    return SchemaValidator(run_schema(), allow_extra_keys=True, prefix=check_run_id(run_id))
