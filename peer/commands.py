"""The handlers of the ``swarm-peer`` sub-commands: build the config, run the module, print the result."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import logging
from typing import Any

from dht.errors import ControlPlaneError
from peer import __version__
from peer.config import COMMAND_DEFAULTS, FIELD_SECTION, load_config
from peer.errors import ConfigError
from peer.priority import lower_background_priority

logger = logging.getLogger("peer.cli")


def stop_flag():
    """A StopFlag for a command; under ``swarm-peer demo`` (SWARM_EXIT_WITH_PARENT=1) it is also set
    when the demo process goes away, so no peer outlives it."""
    from peer.training import StopFlag, watch_parent  # torch: not for `health` and `inspect`

    stop = StopFlag()
    if os.environ.get("SWARM_EXIT_WITH_PARENT") == "1":
        watch_parent(stop)
    return stop


def config_from_args(args: argparse.Namespace):
    """The command's config: its flags over the environment over ``--config`` over the command's own defaults
    (:data:`peer.config.COMMAND_DEFAULTS`) over the fields' defaults."""
    overrides = {k: v for k, v in vars(args).items() if k in FIELD_SECTION}
    cfg = load_config(overrides, args.config)
    defaults = COMMAND_DEFAULTS.get(getattr(args, "command", None))
    return cfg.with_defaults(defaults) if defaults else cfg


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key == "kind":
            continue
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


def run_until_stopped(args: argparse.Namespace, run) -> int:
    """The common shape of the long-running commands: config, a stop flag on SIGINT/SIGTERM, run, summary.

    :param run: ``(cfg, stop) -> summary dict or None``
    """
    cfg = config_from_args(args)
    stop = stop_flag()
    with stop.installed():
        summary = run(cfg, stop)
    if summary is not None:
        print_summary(summary, args.json)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from peer.baseline import train_baseline

    return run_until_stopped(args, train_baseline)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from peer.pipeline.launcher import launch

    return run_until_stopped(args, launch)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from dht.bootstrap import Bootstrap

    from peer.data import load_tokenizer
    from peer.session import tokenizer_fields

    cfg = config_from_args(args)
    stop = stop_flag()
    with stop.installed():
        tokenizer = load_tokenizer(cfg.data)  # the run's: its fingerprint and vocabulary go into the signed record
        boot = Bootstrap.start(
            cfg.swarm_run_id, cfg.shared(), __version__, initial_peers=cfg.net.initial_peers,
            host_maddrs=cfg.net.host_maddrs, announce_maddrs=cfg.net.announce_maddrs,
            identity_path=cfg.net.identity_path, update_period=cfg.net.update_period, owner=cfg.net.run_owner,
            extra=tokenizer_fields(tokenizer), admission=cfg.net.admission,
        )
        try:
            lower_background_priority(cfg.net.background_nice)  # its DHT process and p2pd (see join)
            if args.json:
                print(json.dumps(boot.summary()), flush=True)
            else:
                print("\n".join(boot.lines()), flush=True)
            logger.info("bootstrap of run %s is up (config %s, %s, %d stages); Ctrl-C to stop",
                        cfg.swarm_run_id, boot.record.hash, cfg.model.preset, cfg.model.stages)
            while not stop:
                time.sleep(0.2)
            logger.info("%s received: shutting down", stop.signal_name)
        finally:
            boot.shutdown()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from dht.inspector import render, snapshot, watch
    from dht.node import SwarmNode
    from dht.owner import run_owner
    from peer.session import member_access
    from peer.training import StopFlag

    cfg = config_from_args(args)
    if not cfg.net.initial_peers:
        raise ConfigError("inspect needs --initial-peers MADDR (a line printed by `swarm-peer bootstrap`) "
                          "or SWARM_INITIAL_PEERS")
    if args.watch is not None and args.watch <= 0:
        raise ConfigError(f"--watch {args.watch}: expected a positive number of seconds")
    owner = run_owner(cfg.net.initial_peers, cfg.net.run_owner)
    key, _, authorizer = member_access(cfg, owner, "observer")
    # the member key signs; a libp2p identity of its own, so that inspect runs beside a peer of that identity
    node = SwarmNode.start(cfg.swarm_run_id, cfg.net.initial_peers, client_mode=True, keys=[key],
                           authorizer=authorizer)
    color = sys.stdout.isatty() and not args.json

    def read() -> dict[str, Any]:
        return snapshot(node, cfg.model.stages, timeout=args.timeout, owner=owner)

    def show(snap: dict[str, Any]) -> str:
        return json.dumps(snap) if args.json else render(snap, color=color)

    try:
        if args.watch is None:
            print(show(read()))
            return 0
        stop = StopFlag()
        with stop.installed():
            watch(read, show, args.watch, stop=lambda: bool(stop), in_place=color)
        return 0
    except TimeoutError as e:
        raise ControlPlaneError(f"the DHT did not answer: {e}; check --initial-peers and the network") from None
    finally:
        node.shutdown()


def cmd_health(args: argparse.Namespace) -> int:
    from peer import health

    address = args.address or health.configured_address(lambda: config_from_args(args))
    return health.report(health.check(address, args.timeout), args.json)


def cmd_join(args: argparse.Namespace) -> int:
    from peer.stage.peer import run_stage_peer

    return run_until_stopped(args, run_stage_peer)


def cmd_train(args: argparse.Namespace) -> int:
    from peer.swarm.trainer import run_trainer

    return run_until_stopped(args, run_trainer)


def cmd_demo(args: argparse.Namespace) -> int:
    from peer.demo import run_demo

    return run_until_stopped(args, lambda cfg, stop: run_demo(cfg, stop, debug=args.debug))


def cmd_simulate(args: argparse.Namespace) -> int:
    from peer.sim.run import run_command

    summary = run_command(config_from_args(args), args.peers, args.duration, args.scenario, args.trace, args.out)
    print_summary(summary, args.json)
    return 0
