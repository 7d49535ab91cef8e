"""Run configuration: pydantic models, one section per concern, and the loader.

Every field is reachable three ways, all derived from its name (``max_steps`` here):

* the command-line flag ``--max-steps`` (highest precedence),
* the environment variable ``SWARM_MAX_STEPS``,
* the TOML key ``max_steps`` in its section (``[train]``) of ``--config run.toml``
  (a top-level key is accepted too),

and otherwise its default. Field names are unique across sections so that the flat
flag / environment names stay unambiguous. The docstring under each field is its
``--help`` text.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from peer.errors import ConfigError
from peer.limits import ATTEMPT_TIMEOUT_S

ENV_PREFIX = "SWARM_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Section):
    preset: Literal["tiny", "llama-14m", "gpt2-124m"] = "llama-14m"
    """Model preset: `tiny` (tests), `llama-14m` (HF Llama, hidden 128, 6 layers), `gpt2-124m` (HF GPT-2, 12x768)."""
    stages: int = Field(2, ge=1, le=64)
    """Number of pipeline stages the model is cut into (swarm and pipeline runs)."""
    partition: Literal["even", "balanced"] = "even"
    """How decoder layers are spread over the stages: `even` counts, or `balanced` estimated compute (the LM head
    counts as the layers it costs)."""


class DataConfig(Section):
    dataset: str = "shakespeare"
    """Training text: `shakespeare` (embedded, offline), `wikitext-2-raw-v1` or `fineweb-edu` (Hugging Face Hub), or
    a local .jsonl/.txt file."""
    tokenizer: str = "bpe"
    """`bpe`: a byte-level BPE trained on the dataset's training split and cached; otherwise a Hub tokenizer name."""
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    """Vocabulary size of the trained `bpe` tokenizer (ignored for Hub tokenizers)."""
    seq_len: int = Field(128, ge=8, le=65536)
    """Tokens per training sequence (documents are concatenated and packed)."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Fraction of documents held out for validation when the dataset has no validation split."""
    cache_dir: Path = Path(os.path.expanduser("~/.cache/swarm-peer"))
    """Where trained tokenizers and tokenized corpora are cached."""


class OptimConfig(Section):
    lr: float = Field(6e-4, gt=0.0, le=1.0)
    """Peak learning rate of AdamW."""
    min_lr: float = Field(6e-5, ge=0.0, le=1.0)
    """Floor of the cosine schedule."""
    warmup_steps: int = Field(100, ge=0)
    """Steps of linear warmup from 0 to `lr`."""
    decay_steps: int | None = Field(None, ge=1)
    """Steps at which the cosine reaches `min_lr` (default: `max_steps`)."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW weight decay, applied to matrices and embeddings only."""
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    """AdamW beta2."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 disables)."""


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to train for."""
    batch_size: int = Field(32, ge=1)
    """Sequences per optimizer step (the global batch)."""
    microbatch_size: int = Field(8, ge=1)
    """Sequences per forward/backward pass; batch_size / microbatch_size micro-batches are accumulated."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks CUDA when available, else CPU."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast on CUDA, fp32 on CPU; `bf16` forces autocast on CPU too."""
    seed: int = 0
    """Seed for weights, data order and dropout."""
    eval_interval: int = Field(100, ge=0)
    """Validate every N steps (0: only at the end)."""
    eval_batches: int = Field(8, ge=1)
    """Fixed validation micro-batches per evaluation."""
    checkpoint_interval: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM)."""
    checkpoint_dir: Path | None = None
    """Checkpoint directory (default: <run dir>/checkpoints)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many recent checkpoints to keep."""
    resume: bool = False
    """Continue from the latest checkpoint in the checkpoint directory."""

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        if self.batch_size % self.microbatch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of microbatch_size ({self.microbatch_size})"
            )
        return self


class LogConfig(Section):
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Name of the run: the swarm's namespace in the DHT (default `swarm`) and the directory under runs/ (baseline
    default: the command and a timestamp)."""
    run_dir: Path | None = None
    """Where metrics.jsonl and checkpoints go (default: runs/<run-id>)."""
    log_interval: int = Field(10, ge=1)
    """Log metrics every N steps."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (offline unless --wandb-mode online)."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode; offline runs can be uploaded later with `wandb sync`."""
    progress: bool = True
    """Show a progress bar on a terminal."""


class NetConfig(Section):
    initial_peers: list[str] = []
    """Multiaddr of a running swarm node to join through, as printed by `swarm-peer bootstrap` (repeat the flag for
    several; the variable takes a comma/space-separated list)."""
    host_maddrs: list[str] = ["/ip4/0.0.0.0/tcp/0"]
    """Multiaddrs the DHT node listens on; a fixed port (/ip4/0.0.0.0/tcp/31337) keeps a bootstrap's address stable."""
    announce_maddrs: list[str] = []
    """Multiaddrs others should dial to reach this DHT node (public IP, port forwarding; explicit port); default: the
    listening ones."""
    identity_path: Path | None = None
    """Key file of this node (created if missing; the record-signing key goes beside it as <file>.rsa): a stable peer
    id and address across restarts."""
    update_period: float = Field(15.0, ge=0.5, le=3600.0)
    """Seconds between refreshes of this peer's DHT records; a record expires after 3 periods without one."""
    throughput: str = "auto"
    """Samples/s this peer announces: `auto` (measure once, reuse the on-disk cache), `eval` (measure again), or a
    number."""

    @field_validator("throughput")
    @classmethod
    def _throughput_setting(cls, value: str) -> str:
        if value in ("auto", "eval"):
            return value
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number > 0 or number == float("inf"):
            raise ValueError("expected `auto`, `eval` or a positive number of samples/s")
        return value


class SwarmConfig(Section):
    stage: str = "auto"
    """Stage this peer serves: a number, or `auto` for the stage with the least throughput when it joins."""
    host: str = "0.0.0.0"
    """Address the stage peer's gRPC server listens on."""
    port: int = Field(0, ge=0, le=65535)
    """gRPC port of the stage peer (0: any free port)."""
    announce_host: str | None = None
    """Host others dial to reach this peer's gRPC port (a public IP behind port mapping); default: the local address
    that routes to the initial peers."""
    public_name: str | None = Field(None, max_length=64)
    """A name shown next to this peer in `swarm-peer inspect`."""
    max_in_flight: int = Field(16, ge=1, le=4096)
    """Microbatches a stage peer holds at once; more get RESOURCE_EXHAUSTED and go to its stage-mates."""
    in_flight: int = Field(4, ge=1, le=1024)
    """Microbatches a trainer keeps in flight through the swarm."""
    step_sync: bool = False
    """Trainer: finish every global batch before sending the next one's microbatches (slower; exactly the baseline's
    steps)."""
    max_tokens: int | None = Field(None, ge=1)
    """Trainer: stop after this many training tokens (besides --max-steps)."""
    codec: Literal["none", "fp16", "bf16", "int8"] = "none"
    """Compression of activations and gradients on the links this peer sends over."""
    hop_timeout: float = Field(120.0, gt=0)
    """Seconds a microbatch may take for its whole route before the trainer retries it."""
    attempt_timeout: float = Field(ATTEMPT_TIMEOUT_S, gt=0)
    """Seconds a peer may take to acknowledge a microbatch before the sender bans it and tries another: how fast a
    hung peer is found out (the rest of the route may take up to --hop-timeout)."""
    checkpoint_every: int = Field(0, ge=0)
    """Stage peer: save the stage's state to --checkpoint-dir every N optimizer steps (0: only when leaving)."""
    drain_timeout: float = Field(0.0, ge=0)
    """Stage peer: seconds an update waits for microbatches past their forward; those still pending then recompute
    their forward at backward (`inf`: always wait)."""
    matchmaking_time: float = Field(2.0, gt=0)
    """Seconds a stage peer looks for its stage-mates before an all-reduce of gradients."""
    averaging_timeout: float = Field(15.0, gt=0)
    """Seconds an all-reduce (or a state download) may take before a peer proceeds alone."""
    average_state_every: int = Field(0, ge=0)
    """Also average parameters and optimizer state every N steps (0: never; gradient averaging keeps replicas equal)."""
    threads: int = Field(0, ge=0)
    """torch CPU threads of this process (0: torch's default; `swarm-peer demo` splits the cores)."""
    background_nice: int = Field(10, ge=0, le=19)
    """Nice value given to this process's helper processes (hivemind's DHT node and averagers, p2pd) so they yield
    the CPU to compute and serving; they still run whenever a core is free (0: leave them as they are)."""
    trainer_index: int = Field(0, ge=0)
    """This trainer's shard of the data when several train at once (0 .. num_trainers-1)."""
    num_trainers: int = Field(1, ge=1)
    """How many trainers share the data (each reads a disjoint shard of every epoch)."""

    @field_validator("stage")
    @classmethod
    def _stage_setting(cls, value: str) -> str:
        if value != "auto" and not (value.isdigit() and int(value) < 64):
            raise ValueError("expected `auto` or a stage number 0..63")
        return value


class DemoConfig(Section):
    peers_per_stage: int = Field(2, ge=1, le=16)
    """`swarm-peer demo`: stage peers started per stage."""
    trainers: int = Field(1, ge=1, le=16)
    """`swarm-peer demo`: trainers started (each reads its own shard of the data)."""
    demo_timeout: float = Field(900.0, gt=0)
    """`swarm-peer demo`: stop the trainers after this many seconds if they have not finished."""
    demo_refresh: float = Field(3.0, ge=0.5)
    """`swarm-peer demo`: seconds between status lines."""
    demo_update_period: float = Field(3.0, ge=0.5)
    """`swarm-peer demo`: --update-period of the demo's peers (short, so the view stays fresh)."""
    demo_throughput: str = "auto"
    """`swarm-peer demo`: --throughput of the demo's stage peers."""


class PipelineConfig(Section):
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """Static pipeline schedule: `gpipe` (all forwards, then all backwards) or `1f1b` (interleaved, less memory)."""
    microbatches: int | None = Field(None, ge=1)
    """Microbatches per step in the pipeline schedule (default: batch_size / microbatch_size)."""
    nnodes: int = Field(1, ge=1)
    """Machines the pipeline's stages are spread over (stages must be a multiple)."""
    node_rank: int = Field(0, ge=0)
    """This machine's index among --nnodes (it runs stages node_rank*S/nnodes ...)."""
    master_addr: str = "127.0.0.1"
    """Address of node 0, where the workers meet (torch.distributed rendezvous)."""
    master_port: int | None = Field(None, ge=1, le=65535)
    """Port of the rendezvous on node 0 (default: a free port on one machine, 29500 on several)."""
    dist_timeout: float = Field(120.0, gt=0)
    """Seconds a worker waits for a peer stage's data before it gives up (torch.distributed timeout)."""


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "log": LogConfig,
    "net": NetConfig,
    "swarm": SwarmConfig,
    "demo": DemoConfig,
    "pipeline": PipelineConfig,
}
# field name -> section name; names are unique across sections (checked at import)
FIELD_SECTION: dict[str, str] = {}
for _section, _cls in SECTIONS.items():
    for _name in _cls.model_fields:
        assert _name not in FIELD_SECTION, f"duplicate config field {_name}"
        FIELD_SECTION[_name] = _section


DEFAULT_SWARM_RUN = "swarm"

SHARED_FIELDS = (
    "preset", "stages", "partition",
    "dataset", "tokenizer", "vocab_size", "seq_len", "val_fraction",
    *OptimConfig.model_fields,
    "max_steps", "batch_size", "microbatch_size", "seed",
)
"""Fields every peer of a swarm run must agree on: the run's config record and its hash cover exactly these."""


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
            if key in SECTIONS and isinstance(value, dict):
                for sub, subvalue in value.items():
                    if FIELD_SECTION.get(sub) != key:
                        raise ConfigError(_unknown_key(self.path, f"[{key}] {sub}", sub, SECTIONS[key].model_fields))
                    flat[sub] = subvalue
            elif key in FIELD_SECTION:
                flat[key] = value
            else:
                raise ConfigError(_unknown_key(self.path, key, key, FIELD_SECTION))
        return nest(flat)


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
    swarm: SwarmConfig = SwarmConfig()
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
