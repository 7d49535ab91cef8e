"""A stage server: a grpc.aio server for one stage, on its own thread and event loop.

The server runs on a private loop in a background thread (hivemind installs uvloop's
policy on import; keeping gRPC on its own loop keeps the two apart). It serves
``swarm.v1.Stage`` and the standard ``grpc.health.v1.Health`` service (service name
``swarm.v1.Stage``; NOT_SERVING while draining). With ``tls`` (a :class:`peer.rpc.tls.ServerTLS`) it
serves TLS only; its ``tls.sha256`` is what the peer's record pins.

    server = StageServer(runtime, next_hop=StaticNextHop(["127.0.0.1:5001"]), host="127.0.0.1", port=0)
    server.start()            # returns once it listens; server.address is "127.0.0.1:<port>"
    ...
    server.stop(grace=10)     # refuse new hops, finish in-flight ones, stop
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Callable, Coroutine

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from peer import __version__
from peer.rpc import stage_pb2 as pb
from peer.rpc import wire
from peer.rpc.client import SERVER_OPTIONS, NextHop
from peer.rpc.tls import ServerTLS
from peer.stage.runtime import StageRuntime
from peer.stage.servicer import StageServicer

logger = logging.getLogger(__name__)
MAX_CONCURRENT_RPCS = 256
SERVICE = "swarm.v1.Stage"


def _lenient(parser: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that returns None for bytes that do not parse, so the handler can answer
    INVALID_ARGUMENT with a message instead of gRPC's generic INTERNAL."""

    def parse(data: bytes):
        try:
            return parser(data)
        except DecodeError:
            return None

    return parse


class StageServer:
    """Hosts a :class:`StageServicer` on ``host:port`` (port 0: a free port)."""

    def __init__(self, runtime: StageRuntime, next_hop: NextHop | None = None, host: str = "127.0.0.1",
                 port: int = 0, announce_host: str | None = None, tls: ServerTLS | None = None, **servicer_kwargs):
        self.runtime, self.next_hop, self.host, self.tls = runtime, next_hop, host, tls
        self.port = port
        self.announce_host = announce_host or host
        self.servicer_kwargs = servicer_kwargs
        self.loop = asyncio.SelectorEventLoop()  # the standard loop, whatever policy hivemind installed
        self.servicer: StageServicer | None = None
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"stage{runtime.spec.stage}-grpc",
                                        daemon=True)
        self._stopped = False

    @property
    def address(self) -> str:
        """``host:port`` that other peers dial (an IPv6 address in brackets)."""
        host = self.announce_host
        return f"[{host}]:{self.port}" if ":" in host and not host.startswith("[") else f"{host}:{self.port}"

    def call(self, coro: Coroutine, timeout: float | None = None):
        """Run a coroutine on the server's loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, timeout: float = 30.0) -> "StageServer":
        self._thread.start()
        self.call(self._start(), timeout)
        logger.info("stage %d server listening on %s:%d%s", self.runtime.spec.stage, self.host, self.port,
                    f" (TLS, certificate SHA-256 {self.tls.sha256[:16]}...)" if self.tls else "")
        return self

    async def _start(self) -> None:
        self.servicer = StageServicer(self.runtime, self.next_hop, version=__version__, **self.servicer_kwargs)
        # a bound on the calls gRPC holds at once, whoever sends them (more are refused with RESOURCE_EXHAUSTED)
        server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
        handlers = {
            # Hop messages are framed by peer.rpc.wire (the servicer yields bytes); same wire format
            "Hop": grpc.stream_stream_rpc_method_handler(
                self.servicer.Hop, request_deserializer=_lenient(wire.parse_request), response_serializer=None),
            "Info": grpc.unary_unary_rpc_method_handler(
                self._info, request_deserializer=_lenient(pb.InfoRequest.FromString),
                response_serializer=pb.InfoReply.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        listen = f"{self.host}:{self.port}"
        port = server.add_secure_port(listen, self.tls.server_credentials()) if self.tls else \
            server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}")
        self.port = port
        self.servicer.endpoint = self.address  # what callers sign their credentials for
        self.servicer.peer_name = self.servicer.peer_name or self.address
        await server.start()
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server = server

    async def _info(self, request, context):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed InfoRequest (cannot parse)")
        return await self.servicer.Info(request, context)

    def stop(self, grace: float = 10.0) -> bool:
        """Refuse new hops, let in-flight ones finish for up to ``grace`` s, then stop everything.

        :returns: True if every in-flight hop finished in time
        """
        if self._stopped:
            return True
        self._stopped = True
        try:
            finished = self.call(self._stop(grace), timeout=grace + 30)
        except (concurrent.futures.TimeoutError, RuntimeError) as e:
            logger.warning("stage server stop: %s", e)
            finished = False
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
        self.runtime.stop()
        return finished

    async def _stop(self, grace: float) -> bool:
        finished = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.servicer is not None:
            finished = await self.servicer.drain(grace)
            if not finished:
                logger.warning("stopping with %d hop(s) still in flight", self.servicer.in_flight)
        if self._server is not None:
            await self._server.stop(grace=1.0 if finished else 0)
        if self.servicer is not None:
            await self.servicer.client.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:  # e.g. an optimizer watcher: end them here, not in a closed loop later
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        return finished
