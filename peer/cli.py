"""The ``swarm-peer`` command line: sub-commands that map onto the modules of ``peer``.

Every configuration flag comes from a field of :mod:`peer.config` (same flag, same
``SWARM_`` variable, same TOML key in every sub-command). Errors the user can fix end
the command with one line on stderr and exit code 2; ``--debug`` shows the traceback.
Logs go to stderr; results (summaries) go to stdout, the last line as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

from dht.errors import ControlPlaneError
from peer import __version__
from peer import commands as handlers
from peer.commands import config_from_args  # noqa: F401 (part of this module's API)
from peer.config import (
    COMMAND_DEFAULTS, COMMANDS, FIELD_SECTION, command_fields, env_name, field_info, flag_name, is_list_field,
)
from peer.errors import SwarmError
from peer.logs import setup_logging

logger = logging.getLogger("peer.cli")


def _arg_type(annotation) -> tuple[Callable | None, list | None]:
    """argparse type and choices for a field annotation (Optional and Literal unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if args and typing.get_origin(annotation) is not typing.Literal:
        return _arg_type(args[0])
    return {int: int, float: float, Path: Path}.get(annotation, str), None


def add_config_flags(parser: argparse.ArgumentParser, fields: Iterable[str],
                     defaults: dict[str, Any] | None = None) -> None:
    """One flag per config field; only flags the user passes override the lower sources.

    :param defaults: the command's own defaults (shown instead of the field's)
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in fields:
        section = FIELD_SECTION[name]
        group = groups.setdefault(section, parser.add_argument_group(f"{section} ([{section}] in --config)"))
        info = field_info(name)
        default = (defaults or {}).get(name, info.default)
        shown = default if not isinstance(default, Path) else str(default).replace(str(Path.home()), "~")
        shown = " ".join(default) if isinstance(default, list) else shown
        shown = "" if default is None or default == [] else f"default: {shown}; "
        help_text = f"{info.description or ''} [{shown}env {env_name(name)}]".replace("%", "%%")
        if info.annotation is bool:
            group.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        if is_list_field(name):  # repeatable: --initial-peers A --initial-peers B
            group.add_argument(flag_name(name), dest=name, action="append", metavar="MADDR",
                               default=argparse.SUPPRESS, help=help_text)
            continue
        arg_type, choices = _arg_type(info.annotation)
        metavar = "|".join(choices) if choices else {int: "N", float: "X", Path: "PATH"}.get(arg_type, "NAME")
        group.add_argument(flag_name(name), dest=name, type=arg_type, choices=choices, metavar=metavar,
                           default=argparse.SUPPRESS, help=help_text)


def add_common_flags(parser: argparse.ArgumentParser, sections: Iterable[str]) -> None:
    shown = " ".join(f"[{section}]" for section in sections)
    parser.add_argument("--config", type=Path, metavar="FILE.toml", default=None,
                        help=f"TOML file with {shown} sections, as below "
                             "(flags and SWARM_* variables override it) [env SWARM_CONFIG]")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    parser.add_argument("--debug", action="store_true", help="debug logging, and tracebacks on errors")


def add_command(commands, name: str, handler: Callable[[argparse.Namespace], int],
                **parser_kwargs: Any) -> argparse.ArgumentParser:
    """A sub-command with the common flags (``--config``, ``--json``, ``--debug``) and one flag per config field it
    takes (:func:`peer.config.command_fields`)."""
    parser = commands.add_parser(name, **parser_kwargs)
    fields = command_fields(name)
    add_common_flags(parser, dict.fromkeys(FIELD_SECTION[field] for field in fields))
    add_config_flags(parser, fields, COMMAND_DEFAULTS.get(name, {}))
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-peer",
        description="Volunteer peer for SWARM-parallel training of transformers, with the baselines "
                    "SWARM is measured against.",
        epilog="Run `swarm-peer <command> --help` for the flags of a command. Every configuration flag "
               "can also be set as a SWARM_<NAME> environment variable or in a --config TOML file.",
    )
    parser.add_argument("--version", action="version", version=f"swarm-peer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    add_command(
        commands, "baseline", handlers.cmd_baseline,
        help="train the whole model in one process (the baseline SWARM is judged against)",
        description="Single-process baseline trainer: the full model on one device, AdamW with warmup + cosine "
                    "schedule, gradient accumulation, clipping, validation, checkpoints (--resume), metrics to "
                    "the console, <run dir>/metrics.jsonl and W&B (offline by default).",
    )
    add_command(
        commands, "pipeline", handlers.cmd_pipeline,
        help="train with a traditional static pipeline (GPipe / 1F1B), the other baseline",
        description="Static pipeline baseline over torch.distributed.pipelining: launches --stages worker processes "
                    "(one stage each, gloo on CPU, NCCL on CUDA; no torchrun needed), runs the --schedule with "
                    "--microbatches per step, and logs the baseline's metrics from the last stage. Same model "
                    "partition, data, optimizer and checkpoints (per stage, --resume) as `swarm-peer baseline`. "
                    "A worker that dies stops the whole pipeline with a message naming the stage.",
    )
    add_command(
        commands, "join", handlers.cmd_join,
        help="serve a stage of a swarm run (the volunteer's command)",
        description="Join a swarm run as a stage peer: take the run's config from the DHT (model, data and "
                    "optimizer flags are only needed to insist on a value; a mismatch is refused), build --stage "
                    "(a number, or `auto` for the weakest stage), load its current state from the stage's peers, "
                    "measure throughput, serve forward/backward over gRPC on --host/--port (others dial "
                    "--announce-host), average with the stage's peers every global batch. SIGTERM/Ctrl-C: "
                    "DRAINING, in-flight work finished, OFFLINE, exit 0.",
    )
    add_command(
        commands, "train", handlers.cmd_train,
        help="stream training microbatches through a swarm run (a data owner)",
        description="Train through a swarm: keep --in-flight microbatches of the run's data going through "
                    "random routes of stage peers, retry failed ones on other routes, wait while a stage has no "
                    "peer, and log the baseline's metrics plus retries, peers and throughput per stage "
                    "(console, <run dir>/metrics.jsonl, W&B offline by default).",
    )
    add_command(
        commands, "demo", handlers.cmd_demo,
        help="run a whole swarm on this machine: bootstrap, stage peers, trainers",
        description="Start a bootstrap node, --stages x --peers-per-stage stage peers and --trainers trainers as "
                    "separate processes on 127.0.0.1 (one torch thread each), train on the embedded corpus "
                    "(a short run: see the defaults below), show progress and the stages, "
                    "stop everything cleanly and print a summary. Logs and metrics go to runs/<run-id>/.",
    )
    add_command(
        commands, "bootstrap", handlers.cmd_bootstrap,
        help="start a DHT root for a swarm run and publish the run's config",
        description="Start a hivemind DHT node that others join, publish the run's model/training config and its "
                    "hash under {run}_config, and print one `--initial-peers <multiaddr>` line per address others "
                    "can reach it at. Runs until SIGINT/SIGTERM. Use --identity-path and a fixed port in "
                    "--host-maddrs for an address that survives restarts.",
    )
    inspect = add_command(
        commands, "inspect", handlers.cmd_inspect,
        help="show every stage, peer, state, throughput and load of a swarm run",
        description="Read a run's records from the DHT: a table per stage (peers, state, endpoint, throughput, "
                    "queue, in-flight, version, age), per-stage totals, the bottleneck stage, and warnings.",
    )
    inspect.add_argument("--watch", type=float, metavar="SECONDS", default=None,
                         help="refresh every SECONDS until Ctrl-C "
                              "(in place on a terminal; one JSON line each with --json)")
    inspect.add_argument("--timeout", type=float, metavar="SECONDS", default=30.0,
                         help="give up on a DHT read after this long [default: 30]")
    health = add_command(
        commands, "health", handlers.cmd_health,
        help="exit 0 if a stage peer's gRPC server is SERVING, else 1 (the Docker image's HEALTHCHECK)",
        description="Ask a stage peer's grpc.health.v1 service whether swarm.v1.Stage is SERVING: exit 0 if it "
                    "is, else 1 with one line saying what was found (nothing listening, NOT_SERVING while the "
                    "peer drains, no answer within --timeout). Dials --address, by default 127.0.0.1:--port "
                    "(or --host:--port when --host names one address), so SWARM_PORT serves both `join` and this.",
    )
    health.add_argument("--address", metavar="HOST:PORT", default=None,
                        help="the stage peer's gRPC address [default: 127.0.0.1:<--port>]")
    health.add_argument("--timeout", type=float, metavar="SECONDS", default=5.0,
                        help="give up when the peer has not answered after this long [default: 5]")
    _add_admin_commands(commands)
    _add_simulate(commands)
    assert set(commands.choices) == set(COMMANDS), "peer.config.COMMANDS names every sub-command"
    return parser


def _add_admin_commands(commands) -> None:
    from peer import admin

    add_command(
        commands, "identity", admin.cmd_identity,
        help="print this node's peer id and member key (what an invite-only run's owner needs to invite it)",
        description="Create --identity-path (and the record-signing key beside it, <file>.rsa) if missing, and "
                    "print the node's peer id and its member key: send the member key to the owner of an "
                    "invite-only run, and start join/train/inspect with the same --identity-path and the --invite "
                    "the owner sends back.",
    )
    invite = add_command(
        commands, "invite", admin.cmd_invite,
        help="sign an invitation to an invite-only run (its owner's command)",
        description="Sign, with the run owner's identity (--identity-path: the bootstrap's), an invitation that "
                    "admits the holder of --member-key to --run-id as --role until --expires, and print it (one "
                    "swarm-invite:... line, and its id for `swarm-peer revoke`). Works offline.",
    )
    invite.add_argument("--member-key", required=True, metavar="KEY",
                        help="the invitee's member key: the `ssh-rsa ...` line `swarm-peer identity` printed, or a "
                             "file holding it")
    invite.add_argument("--role", choices=["peer", "trainer", "observer"], default="peer",
                        help="peer: serve stages; trainer: send microbatches; observer: read the DHT (inspect) "
                             "[default: peer]")
    invite.add_argument("--expires", metavar="DURATION", default="30d",
                        help="how long the invitation is valid: 3600, 30m, 12h, 7d [default: 30d]")
    revoke = add_command(
        commands, "revoke", admin.cmd_revoke,
        help="revoke invitations to an invite-only run (its owner's command)",
        description="Publish in the run's DHT, signed with the owner's identity (--identity-path: the "
                    "bootstrap's), that these invitations no longer admit anyone. Every node of the run refuses "
                    "them from its next refresh and keeps the list published.",
    )
    revoke.add_argument("ids", nargs="+", metavar="ID",
                        help="an invitation's id (as `swarm-peer invite` printed it) or the whole invitation line")


def _add_simulate(commands) -> None:
    simulate = add_command(
        commands, "simulate", handlers.cmd_simulate,
        help="simulate a swarm of thousands of peers (discrete events, the project's own routing and rebalancing)",
        description="Simulate --peers stage peers for --duration simulated seconds: SWARM (routing.choose per hop, "
                    "the rebalancing policy once per --rebalance-period), SWARM without rebalancing, and static "
                    "pipelines (one fixed peer per stage; a lost peer stalls its pipeline until a replacement has "
                    "loaded the stage), each against the oracle (the best static assignment of the peers present). "
                    "The model: a 1.2B-parameter Llama (32 x 2,048-token microbatches), devices T4/A10/A100/H100 "
                    "rated by their datasheets, each peer's link (bandwidth, latency), averaging rounds and state "
                    "downloads over those links (README, Simulator). Prints a summary; writes result.json and "
                    "throughput, utilisation, peers and moves plots into --out. No GPU, no network.",
    )
    simulate.add_argument("--peers", type=int, metavar="N", default=100,
                          help="stage peers at the start (ignored with --scenario trace) [default: 100]")
    simulate.add_argument("--duration", type=float, metavar="SECONDS", default=3600.0,
                          help="simulated seconds [default: 3600]")
    simulate.add_argument("--scenario", choices=["homogeneous", "heterogeneous", "churn", "trace"],
                          default="heterogeneous",
                          help="homogeneous: T4s on 100 Mbit/s, 25 ms links; heterogeneous: 50%% T4, 30%% A10, "
                               "15%% A100, 5%% H100 on 1 Gbit/5 ms, 200 Mbit/20 ms or 50 Mbit/50 ms links; churn: "
                               "heterogeneous, each peer preempted at 0.2 per hour and replaced ~5 min later; "
                               "trace: the peers of --trace [default: heterogeneous]")
    simulate.add_argument("--trace", type=Path, metavar="FILE.csv", default=None,
                          help="CSV with the header peer,device,join_s,leave_s[,mbit_s,latency_ms], one row per "
                               "stay (leave_s empty: to the end); see the README's Simulator section")
    simulate.add_argument("--out", type=Path, metavar="DIR", default=None,
                          help="run directory for result.json and the plots "
                               "[default: runs/simulate-<scenario>-<peers>-<seed>]")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug)

    try:
        return args.handler(args)
    except (SwarmError, ControlPlaneError) as e:
        if args.debug:
            raise
        print(f"swarm-peer {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"swarm-peer {args.command}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
