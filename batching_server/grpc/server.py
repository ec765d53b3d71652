"""The gRPC server's lifecycle in the app: a ``cleanup_ctx`` that serves ``GRPCInferenceService``
on ``oip.grpc_port`` on the app's event loop, and drains it with the HTTP requests.

On shutdown it stops taking calls when HTTP does (``on_shutdown``) and gives the calls in flight
what is left of ``server.graceful_shutdown_timeout_s``; being added after the batcher's context,
it is unwound before the batcher closes, so those calls are answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog
from aiohttp import web

from ..http.appkeys import METRICS, SETTINGS, WORKER
from .auth import BearerAuthInterceptor
from .proto import grpc_predict_v2_pb2_grpc as services
from .servicer import RPCS, InferenceServicer

__all__ = ["GRPC_SERVER", "GrpcListenError", "GrpcServer", "add_grpc_server"]

log = structlog.get_logger("batching_server")


class GrpcListenError(Exception):
    """The gRPC port could not be bound; the message names the address and the fix."""


@dataclass(slots=True)
class GrpcServer:
    """The running server and the port it listens on."""

    server: grpc.aio.Server
    port: int
    stopping: asyncio.Task[None] | None = field(default=None)


GRPC_SERVER = web.AppKey("grpc_server", GrpcServer)


def add_grpc_server(app: web.Application, *, port: int | None = None) -> None:
    """Serve the Open Inference Protocol over gRPC for ``app``'s lifetime, with its state.

    ``port`` replaces ``oip.grpc_port``; 0 then picks a free one (``app[GRPC_SERVER].port``).
    """

    async def grpc_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        host = settings.oip.grpc_host or settings.server.host
        wanted = settings.oip.grpc_port if port is None else port
        interceptors = []
        if settings.auth.api_keys:
            interceptors.append(
                BearerAuthInterceptor(
                    api_keys=settings.auth.api_keys, rpcs=RPCS, metrics=app[METRICS]
                )
            )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # The same bound as an HTTP body; over it gRPC answers RESOURCE_EXHAUSTED.
                ("grpc.max_receive_message_length", settings.limits.max_upload_bytes),
                ("grpc.max_send_message_length", -1),
                # Without this, a second server on the same port would share it silently
                # instead of failing to start. Worker processes do share it: their
                # supervisor reserved the port for them (batching_server.workers).
                ("grpc.so_reuseport", 1 if WORKER in app else 0),
            ],
        )
        # Generated code, untyped: it registers each method of the servicer by its name.
        services.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(app=app), server
        )
        address = f"[{host}]:{wanted}" if ":" in host else f"{host}:{wanted}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise GrpcListenError(
                f"cannot listen for gRPC on {address} ({exc}): stop what uses the port, or set "
                "oip.grpc_port to a free port (0 turns gRPC off); ports below 1024 need "
                "privileges; oip.grpc_host must be an address of this machine"
            ) from exc
        await server.start()
        running = GrpcServer(server=server, port=bound)
        app[GRPC_SERVER] = running
        log.info("grpc_listening", host=host, port=bound)
        try:
            yield
        finally:
            if running.stopping is None:
                running.stopping = asyncio.create_task(server.stop(0))
            await running.stopping

    async def stop_taking_calls(app: web.Application) -> None:
        # With HTTP's drain: new calls are refused, calls in flight get the drain's time.
        running = app.get(GRPC_SERVER)
        if running is not None and running.stopping is None:
            grace = app[SETTINGS].server.graceful_shutdown_timeout_s
            running.stopping = asyncio.create_task(running.server.stop(grace))

    app.cleanup_ctx.append(grpc_ctx)
    app.on_shutdown.append(stop_taking_calls)
