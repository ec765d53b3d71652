"""OpenTelemetry: the tracer provider, per-request server spans, and one span per batch.

A batch serves many requests, so its span is not a child of any of them: it carries a link
to each request span instead, as the OpenTelemetry specification advises for batching.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.aiohttp_server import (
    AioHttpServerInstrumentor,
    create_aiohttp_middleware,
)
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased

from .. import __version__
from ..core.batcher import BatchFunction, BatchInfo, ItemFailed
from ..settings import TracingSettings

__all__ = [
    "TracedItem",
    "WorkerSpanAttribute",
    "create_tracer_provider",
    "server_span_middleware",
    "traced_batch_function",
]

R = TypeVar("R")


class TracedItem(Protocol):
    """What a batch span needs of each item: its request, and that request's span."""

    @property
    def request_id(self) -> str: ...

    @property
    def span_context(self) -> trace.SpanContext | None: ...


Item = TypeVar("Item", bound=TracedItem)

log = structlog.get_logger("batching_server.batch")


def _exporter(settings: TracingSettings) -> SpanExporter | None:
    # An empty endpoint lets each exporter read OTEL_EXPORTER_OTLP_* itself.
    endpoint = settings.endpoint or None
    if settings.exporter == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    if settings.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=endpoint)
    if settings.exporter == "console":
        return ConsoleSpanExporter()
    return None


class WorkerSpanAttribute(SpanProcessor):
    """Names the worker process on every span, so a trace shows which worker served it."""

    def __init__(self, index: int) -> None:
        self._index = index

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        span.set_attribute("worker", self._index)


def create_tracer_provider(settings: TracingSettings) -> TracerProvider | None:
    """A provider as ``settings`` say, or None when tracing is off. Shut it down on exit."""
    if not settings.enabled:
        return None
    resource = Resource.create(
        {
            SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or settings.service_name,
            SERVICE_VERSION: __version__,
        }
    )
    exporter = _exporter(settings)
    sampler: Sampler | None
    if exporter is None:
        # Nothing leaves the process, so nothing is recorded: spans only carry ids, for the
        # log lines, continued from a client's traceparent. Recording them for nobody
        # would cost the event loop CPU on every request.
        sampler = ALWAYS_OFF
    elif os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = None  # the SDK reads it when no sampler is passed
    else:
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    if exporter is not None:
        # Batched export runs in its own thread: a slow or absent collector costs the
        # request path nothing, and a full buffer drops spans instead of blocking.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


_instrumentation_ready = False


def _prepare_instrumentation() -> None:
    # The aiohttp-server instrumentation keeps its excluded-URL list and meters in module
    # globals that only instrument() fills; it also swaps web.Application globally, which we
    # undo at once and add its middleware to our own app explicitly instead.
    global _instrumentation_ready
    if not _instrumentation_ready:
        instrumentor = AioHttpServerInstrumentor()
        with warnings.catch_warnings():
            # Its web.Application subclass (which we never use) trips aiohttp's warning.
            warnings.simplefilter("ignore", DeprecationWarning)
            instrumentor.instrument()
        instrumentor.uninstrument()
        _instrumentation_ready = True


# Headers OpenTelemetry's propagators read. They encode each value as UTF-8 and raise on
# one that is not (aiohttp keeps undecodable bytes as surrogates), outside any handler that
# could turn the error into an answer: such a header is dropped, as if never sent.
_PROPAGATION_HEADERS = ("traceparent", "tracestate", "baggage")


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _readable_propagation(request: web.Request) -> dict[str, str] | None:
    """The propagation headers that are valid UTF-8, or None when all of them are."""
    found = {name: request.headers.getall(name, []) for name in _PROPAGATION_HEADERS}
    if all(_is_utf8(value) for values in found.values() for value in values):
        return None
    return {
        name: ",".join(values)
        for name, values in found.items()
        if values and all(_is_utf8(value) for value in values)
    }


def server_span_middleware(
    provider: TracerProvider, traced: Callable[[web.Request], bool]
) -> Middleware:
    """One SERVER span per request for which ``traced`` is true (named by route when recorded)."""
    if provider.sampler is ALWAYS_OFF:
        return _unrecorded_server_span_middleware(provider.get_tracer(__name__), traced)
    _prepare_instrumentation()
    spans = create_aiohttp_middleware(tracer_provider=provider)
    tracer = provider.get_tracer(__name__)

    @web.middleware
    async def server_span(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not traced(request):
            return await handler(request)
        readable = _readable_propagation(request)
        if readable is not None:
            # OpenTelemetry's middleware would raise reading them: a plainer span instead,
            # continuing whatever the readable headers carry.
            with tracer.start_as_current_span(
                f"{request.method} {request.path}",
                context=propagate.extract(readable),
                kind=trace.SpanKind.SERVER,
            ):
                return await handler(request)
        response: web.StreamResponse = await spans(request, handler)
        return response

    return server_span


def _unrecorded_server_span_middleware(
    tracer: trace.Tracer, traced: Callable[[web.Request], bool]
) -> Middleware:
    """A SERVER span that is never recorded, so only its ids and the client's trace count.

    OpenTelemetry's aiohttp middleware gathers a dozen request attributes and updates its
    meters before it knows the span will not record; with no exporter that was most of the
    tracing cost on the event loop.
    """

    @web.middleware
    async def server_span(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not traced(request):
            return await handler(request)
        with tracer.start_as_current_span(
            request.method,
            context=propagate.extract(
                request.headers
                if (readable := _readable_propagation(request)) is None
                else readable
            ),
            kind=trace.SpanKind.SERVER,
            record_exception=False,
            set_status_on_exception=False,
        ):
            return await handler(request)

    return server_span


def traced_batch_function(
    batch_fn: BatchFunction[Item, R],
    *,
    tracer: trace.Tracer,
    model_name: str,
    device: str,
) -> BatchFunction[Item, R]:
    """Wrap ``batch_fn`` in a batch span linked to each request, and log one line per batch."""

    async def run(items: Sequence[Item], info: BatchInfo) -> Sequence[R | ItemFailed]:
        links = [
            trace.Link(item.span_context)
            for item in items
            if item.span_context is not None and item.span_context.is_valid
        ]
        waits_ms = [w * 1000 for w in info.queue_waits_s]
        attributes = {
            "batch.size": info.size,
            "batch.dispatch_reason": info.reason,
            "batch.queue_wait_ms.max": max(waits_ms),
            "batch.queue_wait_ms.mean": sum(waits_ms) / len(waits_ms),
            "model.name": model_name,
            "model.device": device,
        }
        with tracer.start_as_current_span(
            f"{model_name}.batch", links=links, attributes=attributes
        ):
            started = time.perf_counter()
            results = await batch_fn(items, info)
            # Logged once the batch's answers are out: the batcher resolves each waiting
            # request in this same step, and their handlers run in the loop's next round,
            # so a callback queued now that queues the line then writes it after them. The
            # callbacks carry this context, so the line still gets the batch's trace_id.
            loop = asyncio.get_running_loop()
            loop.call_soon(
                loop.call_soon,
                functools.partial(
                    log.info,
                    "batch_completed",
                    size=info.size,
                    dispatch_reason=info.reason,
                    queue_wait_ms_max=round(max(waits_ms), 3),
                    inference_ms=round((time.perf_counter() - started) * 1000, 3),
                    request_ids=sorted({item.request_id for item in items}),
                ),
            )
            return results

    return run
