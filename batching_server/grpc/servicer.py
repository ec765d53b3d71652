"""``GRPCInferenceService``: the Open Inference Protocol over gRPC, on the app's own readiness,
decode pool and batcher (the same path as REST, in ``http/oip_infer.py``).

Each method declares its policy where it is defined, as HTTP routes do: it needs an API key
unless it says ``public=True``, and gets a server span unless it says ``traced=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from aiohttp import web
from opentelemetry import propagate, trace

from .. import __version__
from ..core.errors import DeadlineExceededError, NotReadyError, ServiceError
from ..http.appkeys import DECODE_POOL, METRICS, READINESS, RUNNER, SETTINGS, TRACER
from ..http.oip_infer import (
    EXTENSIONS,
    MODEL_VERSION,
    SERVER_NAME,
    InferCall,
    check_model,
    infer,
    model_metadata,
)
from ..protocols.oip import InferRequest
from .calls import REQUEST_ID_KEY, SERVICE, Call, metadata_of, record_call, request_id_of
from .codec import infer_request, infer_response
from .proto import grpc_predict_v2_pb2 as pb
from .status import status_code, trailing_metadata

__all__ = ["RPCS", "InferenceServicer", "Rpc"]

log = structlog.get_logger("batching_server.access")

Request = TypeVar("Request")
Response = TypeVar("Response")


@dataclass(frozen=True, slots=True, kw_only=True)
class Rpc:
    """One method of the service and its policy."""

    name: str
    public: bool = False  # callable without an API key when auth.api_keys is set
    traced: bool = True  # gets a server span (probes would only add noise)

    @property
    def path(self) -> str:
        """``/inference.GRPCInferenceService/<name>``: gRPC's name for it on the wire."""
        return f"/{SERVICE}/{self.name}"


RPCS: dict[str, Rpc] = {}
"""Every method of the servicer, by its path: what authentication reads."""

Method = Callable[[Any, Request, Any, Call], Awaitable[Response]]


def _rpc(
    *, public: bool = False, traced: bool = True
) -> Callable[[Method[Request, Response]], Callable[[Any, Request, Any], Awaitable[Response]]]:
    def register(
        method: Method[Request, Response],
    ) -> Callable[[Any, Request, Any], Awaitable[Response]]:
        rpc = Rpc(name=method.__name__, public=public, traced=traced)
        RPCS[rpc.path] = rpc

        @functools.wraps(method)
        async def served(self: InferenceServicer, request: Request, context: Any) -> Response:
            return await self.serve(rpc, functools.partial(method, self, request, context), context)

        return served

    return register


class InferenceServicer:
    """The service's methods over an app's state; pass it to the generated
    ``add_GRPCInferenceServiceServicer_to_server``."""

    def __init__(self, *, app: web.Application) -> None:
        self._app = app

    async def serve(
        self, rpc: Rpc, method: Callable[[Call], Awaitable[Response]], context: Any
    ) -> Response:
        """Run one call with its request id, span, metrics and log line; errors become
        status codes (with a 503's retry hint in the trailing metadata)."""
        started = time.perf_counter()
        metadata = metadata_of(context.invocation_metadata())
        call = Call(path=rpc.path, request_id=request_id_of(metadata))
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        metrics = self._app[METRICS]
        span: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if rpc.traced:
            span = self._app[TRACER].start_as_current_span(
                rpc.path,
                context=propagate.extract(metadata),
                kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": rpc.name},
                record_exception=False,
                set_status_on_exception=False,
            )
        with span as current:
            error: ServiceError | None = None
            metrics.in_flight.inc({})
            try:
                response = await method(call)
            except asyncio.CancelledError:
                # The client went away or its deadline passed: there is no one to answer.
                record_call(
                    metrics,
                    call,
                    status=499,
                    grpc_status="CANCELLED",
                    seconds=time.perf_counter() - started,
                    error_type="client_closed_request",
                )
                raise
            except ServiceError as exc:
                error = exc
            except Exception:
                # The traceback goes to the log, never to the client.
                log.exception("unhandled_error", request_id=call.request_id, route=rpc.path)
                error = ServiceError(
                    "internal server error; quote the x-request-id when reporting it"
                )
            finally:
                metrics.in_flight.dec({})
            code = grpc.StatusCode.OK if error is None else status_code(error.status)
            if current is not None and error is not None:
                current.set_attribute("rpc.grpc.status_code", code.value[0])
                current.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
            record_call(
                metrics,
                call,
                status=200 if error is None else error.status,
                grpc_status=code.name,
                seconds=time.perf_counter() - started,
                error_type=None if error is None else error.error_type,
            )
        if error is not None:
            await context.abort(
                code,
                error.message,
                trailing_metadata=((REQUEST_ID_KEY, call.request_id), *trailing_metadata(error)),
            )
        return response

    def _timeout_s(self, context: Any) -> float:
        """The configured request deadline, or the client's gRPC deadline when sooner."""
        configured = self._app[SETTINGS].batching.request_timeout_s
        remaining = context.time_remaining()
        if remaining is None:
            return configured
        if remaining <= 0:
            raise DeadlineExceededError("the call's gRPC deadline had passed when it arrived")
        return min(configured, float(remaining))

    @_rpc(public=True, traced=False)
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any, call: Call
    ) -> pb.ServerLiveResponse:
        """Live while the process can serve."""
        return pb.ServerLiveResponse(live=not self._app[READINESS].failed)

    @_rpc(public=True, traced=False)
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any, call: Call
    ) -> pb.ServerReadyResponse:
        """Ready once the model is loaded and warmed up, and until the drain begins."""
        return pb.ServerReadyResponse(ready=self._app[READINESS].ready)

    @_rpc()
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any, call: Call
    ) -> pb.ModelReadyResponse:
        """Whether the named model is ready (NOT_FOUND for a model not served here)."""
        check_model(self._app, request.name, request.version)
        return pb.ModelReadyResponse(ready=self._app[READINESS].ready)

    @_rpc()
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any, call: Call
    ) -> pb.ServerMetadataResponse:
        """The server's name, version and protocol extensions."""
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
        )

    @_rpc()
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any, call: Call
    ) -> pb.ModelMetadataResponse:
        """The model's inputs and outputs, as tensors."""
        name = check_model(self._app, request.name, request.version)
        described = model_metadata(self._app, name)
        return pb.ModelMetadataResponse(
            name=described["name"],
            versions=described["versions"],
            platform=described["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["outputs"]],
        )

    @_rpc()
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any, call: Call
    ) -> pb.ModelInferResponse:
        """Classify a batch of images sent as one input tensor."""
        started = time.monotonic()
        app = self._app
        readiness = app[READINESS]
        if not readiness.ready:
            raise NotReadyError(f"the server is not ready: {readiness.reason}")
        name = check_model(app, request.model_name, request.model_version)

        async def read() -> InferRequest:
            # Typed contents of a large batch are many Python objects: off the loop.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(app[DECODE_POOL].executor, infer_request, request)

        def count_images(count: int) -> None:
            call.images = count

        parsed, outputs = await infer(
            app,
            InferCall(
                request_id=call.request_id,
                started=started,
                timeout_s=self._timeout_s(context),
                on_image_count=count_images,
            ),
            read,
        )
        return infer_response(
            model_name=name, model_version=MODEL_VERSION, request_id=parsed.id, outputs=outputs
        )

    @_rpc()
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any, call: Call
    ) -> pb.RepositoryModelLoadResponse:
        """Not offered: a process serves the one model its settings name."""
        raise _Unimplemented(f"this server serves only {self._app[RUNNER].name!r}; set model.name")

    @_rpc()
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any, call: Call
    ) -> pb.RepositoryModelUnloadResponse:
        """Not offered: a process serves the one model its settings name."""
        raise _Unimplemented("the served model cannot be unloaded; stop the server instead")


class _Unimplemented(ServiceError):
    # The client's mistake, not the server's: counted as a 4xx (like REST's 405 for a method
    # a path lacks), so it burns no error budget; UNIMPLEMENTED on gRPC (see status.py).
    status = 405
    error_type = "not_implemented"
