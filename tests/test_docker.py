"""The Docker deployment, checked without a Docker engine (hadolint runs in `make lint`).

* the Dockerfile: pinned base, non-root, exec-form entrypoint, SIGTERM, ports, volume, HEALTHCHECK;
* .dockerignore: the build context holds what the image installs and nothing a checkout accumulates;
* docker/compose.yaml (+ compose.gpu.yaml), at `docker compose config` level: every service runs a real
  `swarm-peer` sub-command whose `--help` lists each flag it passes, with values the config accepts;
  services, depends_on, healthchecks, networks and volumes agree; the bootstrap's address is the one
  its identity file and port give;
* slow: the image's entrypoint with compose services' commands, and the image's HEALTHCHECK
  command, run as local processes: healthy while the peer serves, unhealthy once it has left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.utils.multiaddr import Multiaddr

from conftest import BIN
from docker_files import DOCKER, ROOT, compose, dockerfile, dockerignore_patterns, dockerignored, seconds
from peer.cli import build_parser
from peer.commands import config_from_args

IMAGE_ROOT = "/data"  # the image's volume and working directory
COMPOSE_KEYS = {"image", "build", "pull_policy", "command", "environment", "networks", "volumes", "depends_on",
                "healthcheck", "restart", "stop_signal", "stop_grace_period", "deploy"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def subcommands() -> set[str]:
    return set(build_parser()._subparsers._group_actions[0].choices)


def help_text(command: str) -> str:
    proc = subprocess.run([str(BIN / "swarm-peer"), command, "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def help_flags(command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", help_text(command)))


def services() -> dict[str, dict]:
    return compose()["services"]


def role(service: dict) -> str:
    return service["command"][0]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --- Dockerfile and build context ---------------------------------------------------------------------------

def test_dockerfile_pins_its_base_runs_as_a_user_and_stops_gracefully():
    df = dockerfile()
    base = df.base  # the default of its BASE_IMAGE argument: what users build on
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", base), f"base image not pinned to a version tag: {base}"
    user = df.last("USER").split(":")[0]
    assert user not in ("root", "0") and df.last("STOPSIGNAL") == "SIGTERM"
    entry = df.entrypoint
    assert entry[-1] == "swarm-peer", entry
    if len(entry) > 1:  # an init in front: it must exec swarm-peer and signal it alone (no -g: see the Dockerfile)
        assert os.path.basename(entry[0]) == "tini" and entry[1:] == ["--", "swarm-peer"], entry


def test_dockerfile_exposes_the_ports_and_volume_its_defaults_use():
    df = dockerfile()
    env = df.env
    dht_port = int(Multiaddr(env["SWARM_HOST_MADDRS"])["tcp"])
    assert {int(env["SWARM_PORT"]), dht_port} <= df.exposed
    assert df.last("VOLUME") == f'["{IMAGE_ROOT}"]' and df.last("WORKDIR") == IMAGE_ROOT
    assert env["SWARM_CACHE_DIR"].startswith(IMAGE_ROOT + "/") and env["HF_HOME"].startswith(IMAGE_ROOT + "/")


def test_healthcheck_is_swarm_peer_health_with_flags_it_has():
    options, command = dockerfile().healthcheck
    assert command[:2] == ["swarm-peer", "health"], command
    assert flags(command) <= help_flags("health"), command
    assert seconds(options["timeout"]) > float(option(command, "--timeout")), (options, command)
    assert seconds(options["start-period"]) >= 60  # joining (state download, throughput) takes a while


def test_build_context_holds_what_the_image_installs_and_nothing_else():
    patterns = dockerignore_patterns()
    copied = [src for rest in dockerfile().args("COPY") for src in rest.split()[:-1]]
    assert copied, "the Dockerfile copies nothing"
    for src in copied:
        assert (ROOT / src).exists() and not dockerignored(src, patterns), src
    for kept in ("peer/cli.py", "peer/data/shakespeare.jsonl.xz", "dht/node.py", "setup.cfg", "README.md"):
        assert not dockerignored(kept, patterns), kept
    for left_out in (".git/HEAD", ".venv/bin/python", "runs/demo/metrics.jsonl", "wandb/run-1/x", "tests/test_cli.py",
                     "peer/__pycache__/cli.cpython-311.pyc", "swarm_peer.egg-info/PKG-INFO", ".pytest_cache/v",
                     "docker/identity/bootstrap.id", "benchmarks/transport.py"):
        assert dockerignored(left_out, patterns), left_out


# --- compose files ------------------------------------------------------------------------------------------

def test_every_service_runs_a_real_subcommand_with_flags_its_help_lists(monkeypatch):
    image_env = dockerfile().env
    known, helps = subcommands(), {}
    for name, service in services().items():
        assert set(service) <= COMPOSE_KEYS, (name, set(service) - COMPOSE_KEYS)
        command = service["command"]
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), (name, command)
        assert role(service) in known, f"{name}: `swarm-peer {role(service)}` is not a sub-command"
        listed = helps.setdefault(role(service), help_flags(role(service)))
        unknown = flags(command) - listed
        assert not unknown, f"{name}: `swarm-peer {role(service)} --help` does not list {sorted(unknown)}"
        with monkeypatch.context() as m:  # the variables the container sees
            for key, value in {**image_env, **service.get("environment", {})}.items():
                m.setenv(key, str(value))
            config_from_args(build_parser().parse_args(command))  # ConfigError on a value the config refuses


def test_services_build_the_image_and_stop_with_time_to_drain():
    for name, service in services().items():
        assert service["image"] == "swarm-peer", name
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == \
            (DOCKER / "Dockerfile").resolve(), name
        assert seconds(service["stop_grace_period"]) >= 30 and service["stop_signal"] == "SIGTERM", name


def test_dependencies_healthchecks_networks_and_volumes_agree():
    spec, image_check = compose(), dockerfile().healthcheck[1]
    all_services, declared_networks = spec["services"], set(spec.get("networks", {}))
    used_networks, used_volumes = set(), set()
    for name, service in all_services.items():
        check = service["healthcheck"]
        if check.get("disable"):
            assert role(service) != "join", f"{name}: a stage peer needs its health check"
        else:
            assert check["test"][0] in ("CMD", "CMD-SHELL") and seconds(check["interval"]) > 0, name
            if role(service) == "join":
                assert check["test"][1:] == image_check, f"{name}: not the image's HEALTHCHECK command"
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in all_services and dependency != name, (name, dependency)
            assert how["condition"] in CONDITIONS, (name, how)
            if how["condition"] == "service_healthy":
                assert not all_services[dependency]["healthcheck"].get("disable"), (name, dependency)
        used_networks |= set(service["networks"])
        for mount in service["volumes"]:
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind-mount source {source} is missing"
            else:
                used_volumes.add(source)
    assert used_networks == declared_networks and spec["networks"]["swarm"].get("internal") is True
    assert used_volumes == set(spec.get("volumes", {}))
    assert _acyclic({n: set(s.get("depends_on", {})) for n, s in all_services.items()})


def _acyclic(edges: dict[str, set[str]]) -> bool:
    done: set[str] = set()
    while len(done) < len(edges):
        ready = {n for n, deps in edges.items() if n not in done and deps <= done}
        if not ready:
            return False
        done |= ready
    return True


def test_the_swarm_has_two_stages_of_two_peers_a_trainer_and_an_inspector():
    roles = [role(s) for s in services().values()]
    assert sorted(roles) == sorted(["bootstrap", "join", "join", "join", "join", "train", "inspect"]), roles
    joins = [s["command"] for s in services().values() if role(s) == "join"]
    assert sorted(option(c, "--stage") for c in joins) == ["0", "0", "1", "1"]
    for name in ("--public-name", "--checkpoint-dir"):
        assert len({option(c, name) for c in joins}) == 4, f"two stage peers share {name}"


def test_initial_peers_is_the_address_the_bootstrap_identity_and_port_give():
    [(boot_name, boot)] = [(n, s) for n, s in services().items() if role(s) == "bootstrap"]
    listen = Multiaddr(option(boot["command"], "--host-maddrs"))
    identity = option(boot["command"], "--identity-path")
    mounts = dict(reversed(m.split(":")[:2]) for m in boot["volumes"])
    mount_point = next(t for t in mounts if identity.startswith(t + "/"))
    key_file = DOCKER / mounts[mount_point] / identity[len(mount_point) + 1:]
    assert key_file.exists() and Path(f"{key_file}.rsa").exists(), key_file
    peer_id = PeerID.from_identity(key_file.read_bytes()).to_base58()
    others = [s for s in services().values() if role(s) != "bootstrap"]
    addresses = {option(s["command"], "--initial-peers") for s in others}
    assert addresses == {f"/dns4/{boot_name}/tcp/{listen['tcp']}/p2p/{peer_id}"}, addresses
    assert all(s["depends_on"] for s in others)


def test_gpu_override_reserves_gpus_for_the_stage_peers(monkeypatch):
    base, gpu = services(), compose("compose.gpu.yaml")["services"]
    assert set(gpu) == {n for n, s in base.items() if role(s) == "join"}
    for name, service in gpu.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert device.get("count") == "all" or device.get("device_ids"), name
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, str(value))
        cfg = config_from_args(build_parser().parse_args(base[name]["command"]))
        assert cfg.train.device == "cuda", name


# --- the image's commands against local processes -----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Localized:
    """Container commands and variables rewritten for this machine: 0.0.0.0 -> 127.0.0.1, the service name of the
    bootstrap -> localhost, the image's ports -> free local ones, container paths -> a temporary directory."""

    def __init__(self, ports: dict[int, int], mounts: dict[str, Path]):
        self.ports, self.mounts = ports, mounts

    def arg(self, text: str) -> str:
        text = text.replace("0.0.0.0", "127.0.0.1").replace("/dns4/bootstrap/", "/dns4/localhost/")
        for inside, outside in self.ports.items():
            text = re.sub(rf"/tcp/{inside}\b", f"/tcp/{outside}", text)
            text = str(outside) if text == str(inside) else text
        for inside, outside in self.mounts.items():
            text = str(outside) + text[len(inside):] if text == inside or text.startswith(inside + "/") else text
        return text

    def env(self, service: dict | None = None) -> dict[str, str]:
        env = {k: self.arg(v) for k, v in dockerfile().env.items() if k.startswith("SWARM_") and k != "SWARM_CACHE_DIR"}
        env.update({k: self.arg(str(v)) for k, v in (service or {}).get("environment", {}).items()})
        env["SWARM_HOST"] = "127.0.0.1"  # listen on loopback only (the image listens on every interface)
        env["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # `swarm-peer` as in the image
        return env  # SWARM_CACHE_DIR stays the test session's: the tokenizer is trained once


def entrypoint() -> list[str]:
    """The image's ENTRYPOINT; without its init (tini) where this machine has none: tini only passes SIGTERM on."""
    entry = dockerfile().entrypoint
    return entry if len(entry) == 1 or shutil.which(entry[0]) else entry[entry.index("--") + 1:]


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    options, command = dockerfile().healthcheck
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=False,
                          timeout=seconds(options["timeout"]) + 30)


@pytest.mark.slow
def test_compose_commands_through_the_entrypoint_pass_then_fail_the_healthcheck(spawn, tmp_path, run_id):
    image_env = dockerfile().env
    grpc_port = int(image_env["SWARM_PORT"])
    dht_port = int(Multiaddr(image_env["SWARM_HOST_MADDRS"])["tcp"])
    boot_service = services()["bootstrap"]
    boot_port = int(Multiaddr(option(boot_service["command"], "--host-maddrs"))["tcp"])
    (tmp_path / "data").mkdir()
    identity = shutil.copytree(DOCKER / "identity", tmp_path / "identity")  # the bind mount, files as git has them
    local = Localized({grpc_port: free_port(), dht_port: free_port(), boot_port: free_port()},
                      {"/identity": identity, IMAGE_ROOT: tmp_path / "data"})

    boot_cmd = [*entrypoint(), *map(local.arg, boot_service["command"]), "--preset", "tiny", "--run-id", run_id]
    boot = spawn(boot_cmd, env=local.env(boot_service))
    printed = boot.wait_for_stdout(lambda out: "--initial-peers" in out, timeout=90)
    peer_service = services()["stage0-a"]
    expected = Multiaddr(option(peer_service["command"], "--initial-peers"))["p2p"]
    assert f"/p2p/{expected}" in printed, printed  # the identity file gives the peer id compose dials

    peer_env = local.env(peer_service)
    peer_cmd = [*entrypoint(), *map(local.arg, peer_service["command"]), "--run-id", run_id,
                "--throughput", "100", "--update-period", "1"]
    peer = spawn(peer_cmd, env=peer_env)
    deadline = time.monotonic() + 180
    while "peer ONLINE" not in peer.stderr:
        assert peer.proc.poll() is None and time.monotonic() < deadline, peer.stderr[-3000:]
        time.sleep(0.2)
    assert f"127.0.0.1:{peer_env['SWARM_PORT']}" in peer.stderr  # the image's gRPC port, via SWARM_PORT

    healthy = healthcheck(peer_env)
    assert healthy.returncode == 0 and "SERVING" in healthy.stdout, healthy.stderr

    stop_signal = signal.Signals[dockerfile().last("STOPSIGNAL")]  # what `docker stop` sends
    assert peer.stop(stop_signal, timeout=seconds(peer_service["stop_grace_period"])) == 0, peer.stderr[-3000:]
    assert "DRAINING" in peer.stderr and re.search(r"^drained\s+True$", peer.stdout, re.MULTILINE), peer.stdout
    assert (tmp_path / "data" / "checkpoints" / "stage0-a" / "stage-0").is_dir()

    unhealthy = healthcheck(peer_env)
    assert unhealthy.returncode == 1 and "UNAVAILABLE" in unhealthy.stderr, unhealthy
    assert len(unhealthy.stderr.strip().splitlines()) == 1, unhealthy.stderr
    assert boot.stop(stop_signal, timeout=40) == 0, boot.stderr[-3000:]


@pytest.mark.slow
def test_demo_runs_under_the_image_environment(spawn, tmp_path):
    """The image fixes SWARM_PORT and SWARM_HOST_MADDRS: `docker run swarm-peer demo` must not make its peers
    share those ports."""
    image_env = dockerfile().env
    ports = (int(image_env["SWARM_PORT"]), int(Multiaddr(image_env["SWARM_HOST_MADDRS"])["tcp"]))
    local = Localized({p: free_port() for p in ports}, {IMAGE_ROOT: tmp_path})
    env = local.env()
    del env["SWARM_HOST"]
    demo = spawn([*entrypoint(), "demo", "--preset", "tiny", "--max-steps", "2", "--peers-per-stage", "1",
                  "--batch-size", "8", "--microbatch-size", "2", "--eval-interval", "0", "--run-dir", tmp_path / "demo",
                  "--json"], env=env)
    deadline = time.monotonic() + 300
    while demo.proc.poll() is None:
        assert time.monotonic() < deadline, demo.stderr[-3000:]
        time.sleep(0.5)
    assert demo.proc.returncode == 0, demo.stderr[-3000:]
    assert '"steps": [2]' in demo.stdout, demo.stdout
    # gRPC servers share a port without an error (SO_REUSEPORT): check that each peer got its own
    logs = [path.read_text() for path in sorted((tmp_path / "demo" / "logs").glob("stage*.log"))]
    ports = [int(m.group(1)) for log in logs for m in re.finditer(r"peer ONLINE at 127\.0\.0\.1:(\d+)", log)]
    assert len(ports) == 2 and len(set(ports)) == 2 and int(env["SWARM_PORT"]) not in ports, ports
