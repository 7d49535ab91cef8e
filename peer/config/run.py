"""The whole run's configuration and its loader: flags over ``SWARM_`` variables over a TOML file over defaults."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from peer.config.fields import ENV_PREFIX, SHARED_FIELDS, env_name, flag_name, is_list_field, nest
from peer.config.sections import (
    FIELD_SECTION, SECTIONS, DataConfig, DemoConfig, LinkConfig, LogConfig, ModelConfig, NetConfig, OptimConfig,
    PeerConfig, PipelineConfig, TrainConfig, TrainerConfig,
)
from peer.errors import ConfigError

DEFAULT_SWARM_RUN = "swarm"


class _FlatEnvSource(PydanticBaseSettingsSource):
    """Reads ``SWARM_<FIELD>`` for every field of every section."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, required by the ABC
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        flat: dict[str, Any] = {f: os.environ[env_name(f)] for f in FIELD_SECTION if env_name(f) in os.environ}
        for field, value in flat.items():
            if is_list_field(field):  # SWARM_INITIAL_PEERS="/ip4/a/... /ip4/b/..." or "a,b"
                flat[field] = [item for item in re.split(r"[\s,]+", value) if item]
        return nest(flat)


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the TOML file named by ``--config`` / ``SWARM_CONFIG``, sectioned or flat."""

    def __init__(self, settings_cls, path: Path | None):
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, required by the ABC
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            raw = tomllib.loads(Path(self.path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {self.path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {self.path}: {e}") from None
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, dict) and key not in FIELD_SECTION:
                for sub, subvalue in value.items():
                    if FIELD_SECTION.get(sub) != key:
                        raise ConfigError(_misplaced_key(self.path, key, sub))
                    flat[sub] = subvalue
            elif key in FIELD_SECTION:
                flat[key] = value
            else:
                raise ConfigError(_unknown_key(self.path, key, key, FIELD_SECTION))
        return nest(flat)


def _misplaced_key(path, section: str, key: str) -> str:
    """``[section] key`` that is not there: say where it belongs (older files had [swarm]), else guess."""
    if key in FIELD_SECTION:
        return f"[{section}] {key} in {path}: {key} belongs in [{FIELD_SECTION[key]}]"
    if section not in SECTIONS:
        return _unknown_key(path, f"[{section}]", section, SECTIONS)
    return _unknown_key(path, f"[{section}] {key}", key, SECTIONS[section].model_fields)


def _unknown_key(path, shown: str, key: str, known) -> str:
    hint = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown key {shown} in {path}" + (f"; did you mean {hint[0]!r}?" if hint else "")


class RunConfig(BaseSettings):
    """The whole configuration of one run; see the module docstring for its sources."""

    model_config = SettingsConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    net: NetConfig = NetConfig()
    link: LinkConfig = LinkConfig()
    peer: PeerConfig = PeerConfig()
    trainer: TrainerConfig = TrainerConfig()
    demo: DemoConfig = DemoConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def _lr_floor(self) -> "RunConfig":
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"min_lr ({self.optim.min_lr}) must not exceed lr ({self.optim.lr})")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # CLI overrides arrive as init kwargs; the TOML path travels beside them (see load()).
        toml_path = init_settings.init_kwargs.pop("_toml_path", None)
        return (init_settings, _FlatEnvSource(settings_cls), _TomlSource(settings_cls, toml_path))

    @property
    def decay_steps(self) -> int:
        return self.optim.decay_steps or self.train.max_steps

    @property
    def grad_accum(self) -> int:
        return self.train.batch_size // self.train.microbatch_size

    @property
    def swarm_run_id(self) -> str:
        """The run id of swarm commands: ``--run-id``, else the shared default ``swarm``."""
        return self.log.run_id or DEFAULT_SWARM_RUN

    def explicit_fields(self) -> set[str]:
        """Fields set by a flag, an environment variable or the TOML file (not left at their default)."""
        return {name for section in SECTIONS for name in getattr(self, section).model_fields_set}

    def with_defaults(self, values: dict[str, Any]) -> "RunConfig":
        """This config with ``{field: value}`` for every field in ``values`` that it does not set itself; what
        it does set stays the only explicit fields (so defaults can be layered)."""
        mine = self.explicit_fields()
        data = self.model_dump()
        for name, value in values.items():
            if name not in mine:
                data[FIELD_SECTION[name]][name] = value
        new = RunConfig.model_validate(data)
        for section in SECTIONS:
            object.__setattr__(getattr(new, section), "__pydantic_fields_set__",
                               set(getattr(self, section).model_fields_set))
        return new

    def shared(self) -> dict[str, Any]:
        """``{field: value}`` of :data:`SHARED_FIELDS` (JSON types): what the run's config record publishes."""
        flat = {}
        for section in SECTIONS:
            flat.update(getattr(self, section).model_dump(mode="json"))
        return {name: flat[name] for name in SHARED_FIELDS}


def load_config(cli: dict[str, Any] | None = None, config_file: Path | str | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from flat CLI overrides, the environment and a TOML file.

    :param cli: ``{field_name: value}`` for the flags the user passed (nothing else)
    :param config_file: TOML path; falls back to ``$SWARM_CONFIG``
    :raises ConfigError: with one line that names the bad field and where it can be set
    """
    cli = dict(cli or {})
    unknown = [k for k in cli if k not in FIELD_SECTION]
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
    config_file = config_file or os.environ.get(ENV_PREFIX + "CONFIG") or None
    try:
        return RunConfig(**nest(cli), _toml_path=config_file)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        loc = [str(x) for x in err["loc"] if not str(x).startswith("function-")]
        field = next((x for x in reversed(loc) if x in FIELD_SECTION), None)
        message = err["msg"].removeprefix("Value error, ")
        if field is not None:
            where = f"{flag_name(field)} / {env_name(field)} / [{FIELD_SECTION[field]}] {field}"
            value = f" = {err['input']!r}" if not isinstance(err.get("input"), dict) else ""
            parts.append(f"{FIELD_SECTION[field]}.{field}{value}: {message} (set by {where})")
        else:
            parts.append(f"{'.'.join(loc) or 'config'}: {message}")
    return "invalid configuration: " + "; ".join(parts)
