"""The console script: help for every command and flag, version, usage errors."""

import subprocess

from conftest import BIN
from peer.config import command_fields, flag_name


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
