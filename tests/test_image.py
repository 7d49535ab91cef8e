"""The image users run, really built from docker/Dockerfile and really run (podman; `make image-check`).

On a Debian 12 base made here (no registry of images is reachable), the image builds; `swarm-peer --version`
runs in it; a bootstrap, two stage peers and a trainer run as containers on the host's network and train a few
steps; each stage peer's HEALTHCHECK turns healthy once it serves; `podman stop` leaves gracefully with exit 0.

Skipped, with the reason, where podman cannot run containers; ``SWARM_REQUIRE_PODMAN=1`` (CI sets it) turns that
skip into a failure, so CI cannot pass without having run it.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import pytest

from docker_files import dockerfile
from peer import __version__
from podman import LIMITS, Container, build_image, image_size_mb, local_base_image, podman, podman_problem
from test_docker import free_port
from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.image]
TAG = "localhost/swarm-peer:check"
RUN = ["--preset", "tiny", "--stages", "2", "--batch-size", "8", "--microbatch-size", "2", "--max-steps", "4",
       "--warmup-steps", "1", "--decay-steps", "4"]
STEPS = 4


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    problem = podman_problem()
    if problem:
        if os.environ.get("SWARM_REQUIRE_PODMAN") == "1":
            pytest.fail(f"SWARM_REQUIRE_PODMAN=1 but podman cannot run here: {problem}")
        pytest.skip(f"the image check needs podman: {problem}")
    started = time.monotonic()
    base = local_base_image()
    base_s = time.monotonic() - started
    build_image(TAG, base, tmp_path_factory.mktemp("image-build"))
    print(json.dumps({"base_image_s": round(base_s, 1), "build_s": round(time.monotonic() - started - base_s, 1),
                      "image_mb": round(image_size_mb(TAG))}))
    return TAG


@pytest.fixture
def containers():
    """``start(name, args, env=None, healthcheck=False) -> Container``; every container is removed at the end."""
    prefix, started = f"swarm-check-{uuid.uuid4().hex[:6]}", []

    def start(name: str, args: list[str], env: dict[str, str] | None = None, healthcheck: bool = False) -> Container:
        started.append(Container(image=TAG, name=f"{prefix}-{name}", args=args, env=env, healthcheck=healthcheck))
        return started[-1]

    yield start
    for container in started:
        container.remove()


@pytest.mark.timeout(1800)
def test_swarm_peer_runs_in_the_image(image):
    proc = podman("run", "--rm", "--pull", "never", "--no-healthcheck", *LIMITS, image, "--version")
    assert proc.stdout.strip() == f"swarm-peer {__version__}", proc.stdout


@pytest.mark.timeout(1800)
def test_a_swarm_of_containers_trains_and_leaves_gracefully(image, containers, run_id):
    _, check = dockerfile().healthcheck
    grace = 40  # the README's `docker stop -t 40`: a peer drains for at most 25 s, then checkpoints
    boot_port = free_port()
    boot = containers("bootstrap", ["bootstrap", "--run-id", run_id, "--host-maddrs", f"/ip4/127.0.0.1/tcp/{boot_port}",
                                    *RUN])
    printed = wait_until(lambda: re.findall(r"^--initial-peers (\S+)$", boot.logs(), re.M) or not boot.running,
                         timeout=120, what=lambda: f"the bootstrap's --initial-peers line\n{boot.logs()[-3000:]}")
    assert isinstance(printed, list), boot.logs()[-3000:]
    initial = printed[0]

    peers = []
    for stage in (0, 1):
        env = {"SWARM_PORT": str(free_port()), "SWARM_HOST_MADDRS": f"/ip4/127.0.0.1/tcp/{free_port()}",
               "SWARM_HOST": "127.0.0.1"}  # the image's variables, with ports free on this host's network
        peers.append(containers(f"stage{stage}", ["join", "--initial-peers", initial, "--run-id", run_id, "--stage",
                                                  str(stage), "--throughput", "100", "--update-period", "1"],
                                env=env, healthcheck=True))
    for peer in peers:
        assert peer.health == "starting", peer.health  # the start period: joining may take minutes
    for peer in peers:
        wait_until(lambda p=peer: p.run_healthcheck() or not p.running, timeout=240, period=1.0,
                   what=lambda p=peer: f"{p.name}: `{' '.join(check)}` passing\n{p.logs()[-3000:]}")
        assert peer.running and peer.health == "healthy", peer.logs()[-3000:]
        assert "peer ONLINE" in peer.logs()

    trainer = containers("trainer", ["train", "--initial-peers", initial, "--run-id", run_id, "--run-dir",
                                     "/data/runs/trainer", "--log-interval", "1", "--no-progress", "--json"])
    wait_until(lambda: not trainer.running, timeout=300, period=1.0,
               what=lambda: f"the trainer finishing {STEPS} steps\n{trainer.logs()[-3000:]}")
    assert trainer.exit_code == 0, trainer.logs()[-3000:]
    summary = json.loads(podman("logs", trainer.name).stdout.strip().splitlines()[-1])
    assert summary["steps"] == STEPS and summary["lost_microbatches"] == 0, summary

    for peer in peers:
        code, took = peer.stop(grace)
        assert code == 0, f"{peer.name} exited {code} after `podman stop` ({took:.1f} s)\n{peer.logs()[-3000:]}"
        assert took < grace, f"{peer.name} needed SIGKILL"
        logs = peer.logs()
        assert "DRAINING" in logs and re.search(r"^drained\s+True$", logs, re.M), logs[-3000:]
    code, _ = boot.stop(grace)
    assert code == 0, boot.logs()[-3000:]
