"""The config sections: one pydantic model per concern, a docstring per field (its ``--help`` text), and
which sub-commands take each field as a flag."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peer.limits import ATTEMPT_TIMEOUT_S

# The sub-commands, and the config fields each takes as flags. A section names the commands of its fields in
# `commands`; a field that differs says so with `json_schema_extra=only(...)`. A new field therefore gets the flags
# of its section without any list to update (peer.cli builds every parser from command_fields()).
LOCAL_RUNS = ("baseline", "pipeline")
SWARM_RUN = ("bootstrap", "join", "train", "demo")
TRAINING = (*LOCAL_RUNS, *SWARM_RUN)
ADMIN = ("identity", "invite", "revoke")  # an invite-only run's keys and invitations
COMMANDS = (*TRAINING, "inspect", "health", *ADMIN, "simulate")


COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    # `swarm-peer demo`: a short run on a small machine, with short DHT refreshes so its view stays fresh
    "demo": {"max_steps": 30, "warmup_steps": 5, "lr": 2e-3, "min_lr": 2e-4, "matchmaking_time": 1.0,
             "update_period": 3.0, "log_interval": 1},
    # `swarm-peer simulate`: a 1.2B model cut in 4 stages over internet links, with 8-bit activations
    "simulate": {"stages": 4, "codec": "int8"},
}
"""Defaults a command uses instead of the field's own, unless the user sets the field (flag, variable, TOML)."""


def only(*commands: str) -> dict[str, Any]:
    """``json_schema_extra`` of a field taken by exactly these commands (instead of its section's)."""
    unknown = set(commands) - set(COMMANDS)
    assert not unknown, f"unknown command(s) {unknown}"
    return {"commands": commands}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
    commands: ClassVar[tuple[str, ...]] = ()


class ModelConfig(Section):
    commands = TRAINING
    preset: Literal["tiny", "llama-14m", "gpt2-124m", "llama-h128", "llama-h256", "llama-h512",
                    "llama-h1024"] = "llama-14m"
    """Model preset: `tiny` (tests), `llama-14m` (HF Llama, hidden 128, 6 layers), `gpt2-124m` (HF GPT-2, 12x768),
    `llama-h128` .. `llama-h1024` (HF Llama, 4 layers of hidden H, MLP 4H, head dim 32: a width sweep for the
    battle test's square-cube scenario)."""
    stages: int = Field(2, ge=1, le=64, json_schema_extra=only("pipeline", *SWARM_RUN, "inspect", "simulate"))
    """Number of pipeline stages the model is cut into (swarm and pipeline runs)."""
    partition: Literal["even", "balanced"] = Field("even", json_schema_extra=only("pipeline", *SWARM_RUN))
    """How decoder layers are spread over the stages: `even` counts, or `balanced` estimated compute (the LM head
    counts as the layers it costs)."""


class DataConfig(Section):
    commands = TRAINING
    dataset: str = Field("shakespeare", json_schema_extra=only(*LOCAL_RUNS, "bootstrap", "train", "demo"))
    """Training text: `shakespeare` (embedded, offline), `wikitext-2-raw-v1` or `fineweb-edu` (Hugging Face Hub), or
    a local .jsonl/.txt file. A swarm's trainers each read their own; the bootstrap's sets the run's tokenizer."""
    tokenizer: str = Field("bpe", json_schema_extra=only(*LOCAL_RUNS, "bootstrap", "train", "demo"))
    """`bpe`: a byte-level BPE trained on the dataset's training split and cached; otherwise a Hub tokenizer name."""
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    """Vocabulary size of the trained `bpe` tokenizer (ignored for Hub tokenizers)."""
    seq_len: int = Field(128, ge=8, le=65536)
    """Tokens per training sequence (documents are concatenated and packed)."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Fraction of documents held out for validation when the dataset has no validation split."""
    cache_dir: Path = Field(Path(os.path.expanduser("~/.cache/swarm-peer")),
                            json_schema_extra=only(*LOCAL_RUNS, *SWARM_RUN))
    """Where trained tokenizers and tokenized corpora are cached."""


class OptimConfig(Section):
    commands = TRAINING
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


COMPUTES = (*LOCAL_RUNS, "join")  # the commands that run the model themselves
EVALUATES = (*LOCAL_RUNS, "train", "demo")  # the commands that validate


class TrainConfig(Section):
    commands = TRAINING
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to train for."""
    batch_size: int = Field(32, ge=1)
    """Sequences per optimizer step (the global batch)."""
    microbatch_size: int = Field(8, ge=1)
    """Sequences per forward/backward pass; batch_size / microbatch_size micro-batches are accumulated."""
    seed: int = Field(0, json_schema_extra=only(*TRAINING, "simulate"))
    """Seed for weights, data order and dropout (`simulate`: for the simulated world and its random choices)."""
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=only(*COMPUTES))
    """`auto` picks CUDA when available, else CPU."""
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", json_schema_extra=only(*COMPUTES))
    """`auto`: bf16 autocast on CUDA, fp32 on CPU; `bf16` forces autocast on CPU too."""
    threads: int = Field(0, ge=0, json_schema_extra=only("baseline", "pipeline", "join", "train"))
    """torch CPU threads of this process (`pipeline`: of each stage worker; 0: torch's default, while `swarm-peer
    demo` and `pipeline` split the cores)."""
    eval_interval: int = Field(100, ge=0, json_schema_extra=only(*EVALUATES))
    """Validate every N steps (0: only at the end)."""
    eval_batches: int = Field(8, ge=1, json_schema_extra=only(*EVALUATES))
    """Fixed validation micro-batches per evaluation."""
    checkpoint_interval: int = Field(0, ge=0, json_schema_extra=only(*COMPUTES))
    """Save a checkpoint every N steps (0: only at the end, on SIGINT/SIGTERM and when a stage peer leaves)."""
    checkpoint_dir: Path | None = Field(None, json_schema_extra=only(*COMPUTES))
    """Checkpoint directory (default: <run dir>/checkpoints; a stage peer saves none without it)."""
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=only(*COMPUTES))
    """How many recent checkpoints to keep."""
    compute_slowdown: float = Field(1.0, ge=1.0, le=1000.0, json_schema_extra=only(*COMPUTES))
    """Emulate a device this many times slower (tests, benchmarks): each piece of compute keeps the process busy F
    times as long as it took (by the thread's CPU time with one torch thread on CPU, so that other processes
    competing for the cores do not slow the emulated device further; else by wall time). `baseline`: each
    microbatch's forward+backward; `pipeline`: each forward and backward chunk of the stage; `join`: each forward
    and backward job of the compute worker, so the measured throughput (and the announced prior) fall by F."""
    resume: bool = Field(False, json_schema_extra=only(*LOCAL_RUNS))
    """Continue from the latest checkpoint in the checkpoint directory (a stage peer always starts from its stage's
    peers, else from its checkpoint)."""

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        if self.batch_size % self.microbatch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of microbatch_size ({self.microbatch_size})"
            )
        return self


class LogConfig(Section):
    commands = EVALUATES
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                               json_schema_extra=only(*TRAINING, "inspect", "invite", "revoke"))
    """Name of the run: the swarm's namespace in the DHT (default `swarm`) and the directory under runs/ (baseline
    default: the command and a timestamp)."""
    run_dir: Path | None = None
    """Where metrics.jsonl and checkpoints go (default: runs/<run-id>)."""
    log_interval: int = Field(10, ge=1)
    """Log metrics every N steps."""
    wandb_project: str | None = Field(None, json_schema_extra=only(*LOCAL_RUNS, "train"))
    """Log to this Weights & Biases project (offline unless --wandb-mode online)."""
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline",
                                                                 json_schema_extra=only(*LOCAL_RUNS, "train"))
    """W&B mode; offline runs can be uploaded later with `wandb sync`."""
    progress: bool = Field(True, json_schema_extra=only(*LOCAL_RUNS, "train"))
    """Show a progress bar on a terminal."""


class NetConfig(Section):
    """The control plane: this process's hivemind DHT node."""

    commands = ("bootstrap", "join", "train")
    initial_peers: list[str] = Field([], json_schema_extra=only("bootstrap", "join", "train", "inspect", "revoke"))
    """Multiaddr of a running swarm node to join through, as printed by `swarm-peer bootstrap` (repeat the flag for
    several; the variable takes a comma/space-separated list)."""
    run_owner: str | None = Field(None, json_schema_extra=only("bootstrap", "join", "train", "inspect", "revoke"))
    """Peer id of the run's owner (its bootstrap): the run's config is taken only when signed by it. Default: the id
    at the end of the first --initial-peers address (/p2p/<id>), which is the owner when that is the bootstrap's."""
    admission: Literal["open", "invite"] = Field("open", json_schema_extra=only("bootstrap"))
    """Who may join the run: anyone (open), or only peers holding an invitation this bootstrap's identity signed
    (invite; see `swarm-peer invite`). Part of the run's signed record."""
    invite: str | None = Field(None, json_schema_extra=only("join", "train", "inspect"))
    """This peer's invitation to an invite-only run (the swarm-invite:... line `swarm-peer invite` printed, or a
    file holding it); it must be made for this peer's --identity-path."""
    host_maddrs: list[str] = ["/ip4/0.0.0.0/tcp/0"]
    """Multiaddrs the DHT node listens on; a fixed port (/ip4/0.0.0.0/tcp/31337) keeps a bootstrap's address stable."""
    announce_maddrs: list[str] = []
    """Multiaddrs others should dial to reach this DHT node (public IP, port forwarding; explicit port); default: the
    listening ones."""
    identity_path: Path | None = Field(None, json_schema_extra=only("bootstrap", "join", "train", "inspect", *ADMIN))
    """Key file of this node (created if missing; the record-signing key goes beside it as <file>.rsa): a stable peer
    id and address across restarts. A bootstrap's identity owns its run: keep it to restart the bootstrap as the
    run's owner."""
    update_period: float = Field(15.0, ge=0.5, le=3600.0,
                                 json_schema_extra=only("bootstrap", "join", "train", "demo", "simulate"))
    """Seconds between refreshes of this peer's DHT records; a record expires after 3 periods without one."""
    endpoint_scope: Literal["auto", "public", "private", "loopback"] = Field("auto", json_schema_extra=only(
        "join", "train"))
    """Which stage endpoints this peer dials: public addresses only, private ones too (a LAN run), or loopback too (a
    run on one machine); auto: as wide as the --initial-peers' own addresses need (a record naming 127.0.0.1 or a
    LAN host is skipped in a public run)."""
    background_nice: int = Field(10, ge=0, le=19)
    """Nice value given to this process's helper processes (hivemind's DHT node and averagers, p2pd) so they yield
    the CPU to compute and serving; they still run whenever a core is free (0: leave them as they are)."""


class LinkConfig(Section):
    """The data plane: how stage peers and trainers send microbatches to the next stage."""

    commands = ("join", "train")
    codec: Literal["none", "fp16", "bf16", "int8"] = Field("none", json_schema_extra=only("join", "train", "simulate"))
    """Compression of activations and gradients on the links this peer sends over."""
    hop_timeout: float = Field(120.0, gt=0)
    """Seconds a microbatch may take for its whole route before the trainer retries it."""
    attempt_timeout: float = Field(ATTEMPT_TIMEOUT_S, gt=0, json_schema_extra=only("join", "train", "simulate"))
    """Seconds a peer may take to acknowledge a microbatch before the sender bans it and tries another: how fast a
    hung peer is found out (the rest of the route may take up to --hop-timeout)."""


class PeerConfig(Section):
    """A stage peer (`swarm-peer join`): what it serves and how it averages with its stage."""

    commands = ("join",)
    stage: str = "auto"
    """Stage this peer serves: a number, or `auto` for the stage with the least throughput when it joins."""
    host: str = Field("0.0.0.0", json_schema_extra=only("join", "health"))
    """Address the stage peer's gRPC server listens on."""
    port: int = Field(0, ge=0, le=65535, json_schema_extra=only("join", "health"))
    """gRPC port of the stage peer (0: any free port)."""
    announce_host: str | None = None
    """Host others dial to reach this peer's gRPC port (a public IP behind port mapping); default: the local address
    that routes to the initial peers."""
    public_name: str | None = Field(None, max_length=64)
    """A name shown next to this peer in `swarm-peer inspect`."""
    throughput: str = Field("auto", json_schema_extra=only("join", "demo"))
    """Samples/s this peer announces: `auto` (measure once, reuse the on-disk cache), `eval` (measure again), or a
    number."""
    initial_stage: int | None = Field(None, ge=0, lt=64)
    """With `--stage auto`: start in this stage instead of the weakest one (tests, benchmarks); the peer may still
    move."""
    rebalance_period: float = Field(60.0, ge=1.0, json_schema_extra=only("join", "simulate"))
    """With `--stage auto`: seconds between checks whether this peer should move to the bottleneck stage (each
    check is jittered by up to a quarter period)."""
    rebalance_threshold: float = Field(0.2, ge=0.0, json_schema_extra=only("join", "simulate"))
    """Move only if the two stages involved both end up at least this much above the bottleneck's capacity before
    (0.2: 20%); 0 disables rebalancing."""
    rebalance_cooldown: float = Field(300.0, ge=0.0, json_schema_extra=only("join", "simulate"))
    """Seconds after a move during which this peer does not move again."""
    min_stage_peers: int = Field(1, ge=1, json_schema_extra=only("join", "simulate"))
    """A move never takes a stage below this many peers."""
    max_in_flight: int = Field(16, ge=1, le=4096)
    """Microbatches a stage peer holds at once; more get RESOURCE_EXHAUSTED and go to its stage-mates."""
    drain_timeout: float = Field(0.0, ge=0)
    """Seconds an update waits for microbatches past their forward; those still pending then recompute their forward
    at backward (`inf`: always wait)."""
    matchmaking_time: float = Field(2.0, gt=0, json_schema_extra=only("join", "demo"))
    """Seconds a stage peer looks for its stage-mates before an all-reduce of gradients."""
    averaging_timeout: float = Field(15.0, gt=0)
    """Seconds an all-reduce may take before a peer proceeds alone (a third of it: how long a state download waits
    for a donor's next chunk)."""
    state_download_timeout: float = Field(600.0, gt=0)
    """Seconds a whole state download may take (hivemind's default): a stage's parameters and optimizer state are
    ~12 bytes per parameter, so a 60M-parameter stage needs ~60 s at 100 Mbit/s."""
    average_state_every: int = Field(0, ge=0)
    """Also average parameters and optimizer state every N steps (0: never; gradient averaging keeps replicas equal)."""
    tls_cert: Path | None = None
    """PEM certificate to serve gRPC over TLS with (self-signed will do: its SHA-256 goes into this peer's signed
    record and dialers accept exactly it); needs --tls-key. Default: plaintext."""
    tls_key: Path | None = None
    """PEM private key (unencrypted) of --tls-cert."""

    @field_validator("stage")
    @classmethod
    def _stage_setting(cls, value: str) -> str:
        if value != "auto" and not (value.isdigit() and int(value) < 64):
            raise ValueError("expected `auto` or a stage number 0..63")
        return value

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

    @model_validator(mode="after")
    def _tls_pair(self) -> "PeerConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("--tls-cert", "--tls-key") if self.tls_key is None else ("--tls-key", "--tls-cert")
            raise ValueError(f"{given} needs {missing} too: TLS takes a certificate and its private key (or neither, "
                             "for plaintext)")
        return self


class TrainerConfig(Section):
    """A swarm trainer (`swarm-peer train`): a data owner streaming microbatches through the stages."""

    commands = ("train",)
    in_flight: int = Field(4, ge=1, le=1024, json_schema_extra=only("train", "demo", "simulate"))
    """Microbatches a trainer keeps in flight through the swarm."""
    step_sync: bool = False
    """Finish every global batch before sending the next one's microbatches (slower; exactly the baseline's steps)."""
    max_tokens: int | None = Field(None, ge=1)
    """Stop after this many training tokens (besides --max-steps)."""
    trainer_index: int = Field(0, ge=0)
    """This trainer's shard of the data when several train at once (0 .. num_trainers-1)."""
    num_trainers: int = Field(1, ge=1)
    """How many trainers share the data (each reads a disjoint shard of every epoch)."""
    check_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Share of microbatches sent again, forward only, along another route to check the loss the swarm answered
    (0: none); a peer caught answering a loss it could not have computed is routed around from then on."""
    check_tolerance: float = Field(0.02, gt=0.0, le=1.0)
    """Relative loss difference two routes at the same optimizer epochs may show and still agree."""


class DemoConfig(Section):
    """`swarm-peer demo`: a whole swarm on this machine (its own names keep SWARM_DEMO_* variables unambiguous)."""

    commands = ("demo",)
    peers_per_stage: int = Field(2, ge=1, le=16)
    """Stage peers started per stage."""
    trainers: int = Field(1, ge=1, le=16)
    """Trainers started (each reads its own shard of the data)."""
    demo_timeout: float = Field(900.0, gt=0)
    """Stop the trainers after this many seconds if they have not finished."""
    demo_refresh: float = Field(3.0, ge=0.5)
    """Seconds between status lines."""


class PipelineConfig(Section):
    commands = ("pipeline",)
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
    "link": LinkConfig,
    "peer": PeerConfig,
    "trainer": TrainerConfig,
    "demo": DemoConfig,
    "pipeline": PipelineConfig,
}
# field name -> section name; names are unique across sections (checked at import)
FIELD_SECTION: dict[str, str] = {}
for _section, _cls in SECTIONS.items():
    for _name in _cls.model_fields:
        assert _name not in FIELD_SECTION, f"duplicate config field {_name}"
        FIELD_SECTION[_name] = _section
