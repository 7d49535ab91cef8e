"""The [net] section and the swarm run id: list-valued fields from flags, environment and TOML."""

import pytest

import argparse

from peer.cli import add_config_flags, config_from_args
from peer.config import DEFAULT_SWARM_RUN, SHARED_FIELDS, load_config
from peer.errors import ConfigError

A = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDAqZCqKgtMdZuGgcWxCzLHHPMKcJBZShyfDDqjWPTiYj"
B = "/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWF6LzvHF7BinB2Wcrm4SQXRQmGax6Xd8gQdKJX8Zuqkgo"


def test_list_fields_from_repeated_flags_env_and_toml(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    add_config_flags(parser, ["initial_peers", "update_period"])
    args = parser.parse_args(["--initial-peers", A, "--initial-peers", B])
    assert config_from_args(args).net.initial_peers == [A, B]
    assert "--initial-peers MADDR" in parser.format_help() and "SWARM_INITIAL_PEERS" in parser.format_help()

    monkeypatch.setenv("SWARM_INITIAL_PEERS", f"{A}, {B}")
    assert load_config().net.initial_peers == [A, B]
    monkeypatch.setenv("SWARM_INITIAL_PEERS", f"{A} {B}")
    assert load_config().net.initial_peers == [A, B]
    monkeypatch.delenv("SWARM_INITIAL_PEERS")

    toml = tmp_path / "swarm.toml"
    toml.write_text(f'[net]\ninitial_peers = ["{A}"]\nupdate_period = 2.5\n[log]\nrun_id = "exp1"\n')
    cfg = load_config({}, toml)
    assert cfg.net.initial_peers == [A] and cfg.net.update_period == 2.5 and cfg.swarm_run_id == "exp1"


def test_swarm_run_id_default_leaves_the_baseline_default_alone():
    cfg = load_config()
    assert cfg.log.run_id is None  # the baseline still names its run after the command and a timestamp
    assert cfg.swarm_run_id == DEFAULT_SWARM_RUN == "swarm"


def test_throughput_setting_is_auto_eval_or_a_positive_number():
    assert load_config({"throughput": "eval"}).peer.throughput == "eval"
    assert float(load_config({"throughput": "125.5"}).peer.throughput) == 125.5
    for bad in ("fast", "0", "-3"):
        with pytest.raises(ConfigError, match="peer.throughput .*expected `auto`, `eval` or a positive number"):
            load_config({"throughput": bad})


def test_shared_config_covers_the_run_and_not_the_peer():
    shared = load_config({"preset": "tiny", "lr": 1e-3, "device": "cpu"}).shared()
    assert list(shared) == list(SHARED_FIELDS)
    assert shared["preset"] == "tiny" and shared["lr"] == 1e-3 and shared["stages"] == 2
    assert "device" not in shared and "cache_dir" not in shared and "run_id" not in shared


def test_a_clock_far_behind_the_swarm_s_is_refused_with_what_to_do():
    from dht.clock import MAX_SKEW_S, check_clock, clock_lag
    from dht.errors import ControlPlaneError

    now = 1_000_000.0
    assert clock_lag([now - 3.0, now - 10.0, now - 1.0], now) == 0.0 and clock_lag([now + 500.0] * 2, now) is None
    check_clock([now - 3.0, now - 500.0, now - 2.0], now)  # fresh and stale records: nothing to say
    check_clock([now + 5.0, now + 300.0, now - 1.0], now)  # one fast clock (or a liar): the median agrees
    check_clock([now + 300.0, now + 300.0], now)  # two peers say too little
    with pytest.raises(ControlPlaneError, match="120 s behind the swarm's .*timedatectl"):
        check_clock([now + 120.0, now + 125.0, now + 119.0], now)  # the writes are in our future
    check_clock([now + MAX_SKEW_S - 1] * 3, now)
