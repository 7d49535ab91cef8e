"""`swarm-peer health` against an in-process grpc.health.v1 server: exit codes, the one line, the address it dials.

(The real stage peer, SERVING then gone, is in tests/test_docker.py.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from conftest import BIN
from peer.config import load_config
from peer.health import HealthCheckError, check, configured_address, stage_service


def swarm_peer_health(*args, env=None):
    return subprocess.run([str(BIN / "swarm-peer"), "health", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=False)


@pytest.fixture
def health_server():
    """(servicer, "127.0.0.1:<port>"): a gRPC server with only the health service, statuses set by the test."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_service_is_the_stage_servers():
    from peer.stage.server import SERVICE

    assert stage_service() == SERVICE


def test_serving_exits_0_and_not_serving_exits_1_with_one_line(health_server):
    servicer, address = health_server
    servicer.set(stage_service(), health_pb2.HealthCheckResponse.SERVING)
    ok = swarm_peer_health("--address", address)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{address}: swarm.v1.Stage is SERVING", ok

    servicer.set(stage_service(), health_pb2.HealthCheckResponse.NOT_SERVING)
    draining = swarm_peer_health("--address", address)
    assert draining.returncode == 1 and draining.stdout == "", draining
    [line] = draining.stderr.strip().splitlines()
    assert "NOT_SERVING" in line and "draining" in line, line


def test_json_reports_the_status_either_way(health_server):
    servicer, address = health_server
    servicer.set(stage_service(), health_pb2.HealthCheckResponse.NOT_SERVING)
    proc = swarm_peer_health("--address", address, "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {"address": address, "service": "swarm.v1.Stage", "status": "NOT_SERVING",
                                       "detail": "", "serving": False}


def test_a_server_that_is_not_a_stage_peer_and_an_empty_port_are_unhealthy(health_server):
    _, address = health_server  # serves health, but knows no swarm.v1.Stage
    other = check(address, timeout=5)
    assert other.status == "NOT_FOUND" and "not a swarm-peer stage peer" in other.line()
    nobody = swarm_peer_health("--address", f"127.0.0.1:{closed_port()}", "--timeout", "2")
    assert nobody.returncode == 1 and "UNAVAILABLE" in nobody.stderr and "SWARM_PORT" in nobody.stderr, nobody


def test_default_address_is_the_configured_port_on_loopback(health_server):
    servicer, address = health_server
    servicer.set(stage_service(), health_pb2.HealthCheckResponse.SERVING)
    port = address.rsplit(":", 1)[1]
    via_env = swarm_peer_health(env={"SWARM_PORT": port})
    assert via_env.returncode == 0 and via_env.stdout.startswith(f"127.0.0.1:{port}:"), via_env
    via_flag = swarm_peer_health("--port", port, "--host", "127.0.0.1")
    assert via_flag.returncode == 0, via_flag


@pytest.mark.parametrize("host, expected", [("0.0.0.0", "127.0.0.1:31338"), ("::", "127.0.0.1:31338"),
                                            ("10.1.2.3", "10.1.2.3:31338"), ("::1", "[::1]:31338")])
def test_configured_address_dials_a_listening_host(host, expected):
    assert configured_address(lambda: load_config({"host": host, "port": 31338})) == expected


def test_no_port_or_a_bad_setting_exits_1_saying_what_to_set():
    with pytest.raises(HealthCheckError, match="SWARM_PORT"):
        configured_address(lambda: load_config({"port": 0}))
    unset = swarm_peer_health(env={"SWARM_PORT": "0"})
    assert unset.returncode == 1 and "--address" in unset.stderr and "Traceback" not in unset.stderr, unset
    bad = swarm_peer_health(env={"SWARM_PORT": "http"})
    assert bad.returncode == 1 and "SWARM_PORT" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad
    for args in (["--address", "nowhere"], ["--address", "127.0.0.1:1", "--timeout", "0"]):
        proc = swarm_peer_health(*args)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc
