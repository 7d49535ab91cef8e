"""The console script: help for every command and flag, version, usage errors."""

import subprocess

import pytest

from conftest import BIN
from peer.config import command_fields, flag_name, load_config
from peer.errors import ConfigError


def run(*args):
    return subprocess.run([str(BIN / "swarm-peer"), *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands_and_every_flag():
    top = run("--help")
    assert top.returncode == 0 and "baseline" in top.stdout
    sub = run("baseline", "--help")
    assert sub.returncode == 0
    for name in command_fields("baseline"):
        assert flag_name(name) in sub.stdout, name
    assert "SWARM_MAX_STEPS" in sub.stdout and "--config" in sub.stdout and "--json" in sub.stdout


def test_version_and_usage_errors():
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("swarm-peer ")
    missing = run()
    assert missing.returncode == 2 and "command" in missing.stderr
    bad = run("baseline", "--preset", "huge")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_compute_slowdown_is_a_flag_of_the_commands_that_compute_and_is_at_least_one():
    for command in ("baseline", "pipeline", "join"):
        help_text = run(command, "--help")
        assert help_text.returncode == 0 and "--compute-slowdown" in help_text.stdout, command
    assert "--compute-slowdown" not in run("train", "--help").stdout  # a trainer runs no model
    # one field for all three: checked once through the console script (before any process starts) and per value
    low = run("pipeline", "--compute-slowdown", "0.5")
    assert low.returncode == 2 and "train.compute_slowdown = 0.5" in low.stderr, low.stderr
    assert "greater than or equal to 1" in low.stderr
    for bad in (0.0, 0.99):
        with pytest.raises(ConfigError, match="compute_slowdown"):
            load_config({"compute_slowdown": bad})
    assert load_config({"compute_slowdown": 1.0}).train.compute_slowdown == 1.0
