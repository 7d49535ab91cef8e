"""``swarm-peer health``: is a stage peer serving? The Docker image's HEALTHCHECK.

A stage peer (``swarm-peer join``) serves the standard ``grpc.health.v1.Health`` service
beside its own: ``swarm.v1.Stage`` is SERVING from the moment its gRPC server listens,
NOT_SERVING while it drains on SIGTERM, and gone once it has left. This command asks
``Health/Check`` for that service and turns the answer into an exit code: 0 when it is
SERVING, 1 for anything else (Docker reserves 2, so every failure here is 1), with one
line that says what was found. A peer that serves TLS (``join --tls-cert``) is checked over TLS,
trusting the certificate it presents (the check is of the peer's own state, on its own machine: no
``--tls-cert`` flag needed, so the Docker HEALTHCHECK works either way).

    swarm-peer health                          # 127.0.0.1:$SWARM_PORT (the port `join` listens on)
    swarm-peer health --address 10.0.0.5:31338 --timeout 3
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from peer.errors import ConfigError, SwarmError
from peer.rpc import stage_pb2, tls

UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::", "[::]")
HEALTH_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")  # grpc.health.v1 ServingStatus
HINTS = {
    "NOT_SERVING": "the peer is draining or shutting down",
    "UNAVAILABLE": "nothing answers there; is `swarm-peer join` running with this --port / SWARM_PORT?",
    "DEADLINE_EXCEEDED": "no answer in time; the peer may be overloaded (or raise --timeout)",
    "NOT_FOUND": "that gRPC server is not a swarm-peer stage peer",
    "UNIMPLEMENTED": "that gRPC server has no health service: it is not a swarm-peer stage peer",
}


class HealthCheckError(SwarmError):
    """The check could not even be made (no address to dial); exit code 1 like any unhealthy result."""

    exit_code = 1


@dataclass
class Health:
    """What ``Health/Check`` said about ``service`` at ``address``.

    :param status: SERVING, NOT_SERVING, UNKNOWN (a health status) or a gRPC status code
      (UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND, ...) when the call itself failed
    """

    address: str
    service: str
    status: str
    detail: str = ""

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"

    def line(self) -> str:
        if self.status in HEALTH_STATUSES:
            text = f"{self.address}: {self.service} is {self.status}"
        else:
            text = f"{self.address}: the health check of {self.service} failed with {self.status}"
        if self.detail:
            text += f" ({self.detail})"
        hint = HINTS.get(self.status)
        return f"{text}: {hint}" if hint else text


def stage_service() -> str:
    """``swarm.v1.Stage``, read from the generated stubs (protobuf only: no torch, no hivemind)."""
    return stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name


def configured_address(load_config: Callable) -> str:
    """``host:port`` of the peer this process is configured as (``--host``/``--port``, ``SWARM_*``, TOML).

    An unspecified ``--host`` (the default 0.0.0.0) is dialled as 127.0.0.1.

    :raises HealthCheckError: no port is configured, or the configuration is invalid
    """
    try:
        cfg = load_config()
    except ConfigError as e:
        raise HealthCheckError(str(e)) from None
    host, port = cfg.peer.host, cfg.peer.port
    if not port:
        raise HealthCheckError("no port to check: pass --address HOST:PORT, or --port / SWARM_PORT (the port "
                               "`swarm-peer join` listens on; the Docker image sets SWARM_PORT)")
    host = "127.0.0.1" if host in UNSPECIFIED_HOSTS else host
    if ":" in host and not host.startswith("["):  # an IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}"


def check(address: str, timeout: float, service: str | None = None) -> Health:
    """One ``grpc.health.v1.Health/Check`` call (no retries, no waiting for the server to appear).

    :raises HealthCheckError: ``address`` is not HOST:PORT, or ``timeout`` is not positive
    """
    if ":" not in address:
        raise HealthCheckError(f"--address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:31338")
    if not timeout > 0:
        raise HealthCheckError(f"--timeout {timeout}: expected a positive number of seconds")
    service = service or stage_service()
    deadline = time.monotonic() + timeout
    with _channel(address, timeout) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=max(0.1, deadline - time.monotonic()))
        except grpc.RpcError as e:
            detail = (e.details() or "").splitlines()[0] if e.details() else ""
            return Health(address, service, e.code().name, detail)
    return Health(address, service, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _channel(address: str, timeout: float) -> grpc.Channel:
    """A TLS channel that trusts the certificate the peer presents, when it answers a TLS handshake; else
    plaintext."""
    der = tls.fetch_certificate_sync(address, timeout)
    if der is None:
        return grpc.insecure_channel(address)
    try:
        credentials, options = tls.pinned_credentials(der)
    except ValueError:  # a certificate gRPC cannot check: the call fails with UNAVAILABLE, saying why
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials, options=options)


def report(health: Health, as_json: bool) -> int:
    """Print the result (stdout when serving or with ``--json``, else stderr) and return the exit code."""
    if as_json:
        print(json.dumps({**asdict(health), "serving": health.serving}))
    elif health.serving:
        print(health.line())
    else:
        print(f"swarm-peer health: unhealthy: {health.line()}", file=sys.stderr)
    return 0 if health.serving else 1
