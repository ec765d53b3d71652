"""Middleware: request ids, errors as JSON (never a traceback), request metrics and log line."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from ..core.errors import ServiceError
from .appkeys import IMAGE_COUNT, METRICS, REQUEST_ID
from .responses import error_response
from .routes import route_of

__all__ = ["REQUEST_ID_HEADER", "request_context_middleware"]

log = structlog.get_logger("batching_server.access")

REQUEST_ID_HEADER = "X-Request-ID"
# Client ids end up in logs and headers: accept only short, printable, unambiguous ones.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")

# Headers of aiohttp's own HTTP errors that the JSON error must keep (405 lists methods).
_KEPT_HEADERS = ("Allow",)


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _route(request: web.Request) -> str:
    # The template, not the raw path, so logs and metrics have bounded cardinality.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign the request id, turn every error into JSON, send it, then count and log it."""
    started = time.perf_counter()
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    declared = route_of(request)
    style = declared.errors if declared is not None else "native"
    metrics = request.app[METRICS]
    error_type: str | None = None
    metrics.in_flight.inc({})
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        # The client went away (aiohttp cancels the handler): there is no one to answer.
        log.info(
            "request_cancelled",
            request_id=request_id,
            method=request.method,
            route=_route(request),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        metrics.observe_request(
            method=request.method,
            endpoint=_route(request),
            status=499,
            seconds=time.perf_counter() - started,
            error_type="client_closed_request",
        )
        raise
    except ServiceError as exc:
        error_type = exc.error_type
        response = error_response(
            status=exc.status,
            error_type=exc.error_type,
            message=exc.message,
            request_id=request_id,
            headers=exc.headers,
            style=style,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type = exc.reason.lower().replace(" ", "_")
        response = error_response(
            status=exc.status,
            error_type=error_type,
            message=f"{exc.reason}: {request.method} {request.path}",
            request_id=request_id,
            headers={k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers},
            style=style,
        )
    except Exception:
        # The traceback goes to the log, never to the client.
        error_type = "internal_error"
        log.exception("unhandled_error", request_id=request_id, route=_route(request))
        response = error_response(
            status=500,
            error_type="internal_error",
            message="internal server error; quote the request_id when reporting it",
            request_id=request_id,
            style=style,
        )
    finally:
        metrics.in_flight.dec({})
    response.headers[REQUEST_ID_HEADER] = request_id
    status = response.status
    # An error that leaves a compressed body unread: aiohttp would read the rest to keep
    # the connection (for up to 10 s), inflating it, which is the work the error was there
    # to save. Close it instead. An uncompressed body is left to aiohttp's bounded drain,
    # which costs no more than receiving it: a client sending a body too large for the limit
    # then reads the 413 before the connection closes, instead of a reset.
    close = (
        error_type is not None
        and not request.content.is_eof()
        and request.content.total_compressed_bytes is not None  # aiohttp is inflating it
    )
    if close:
        response.force_close()  # says "Connection: close"
    try:
        # Sent before it is counted and logged: a client waits for the answer, not for the
        # bookkeeping (slowest right after a forward pass, with cold caches).
        # aiohttp then finds the response prepared and finished and writes nothing more.
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        status, error_type = 499, "client_closed_request"
    if close:
        # The transport sends what it holds, then closes; aiohttp skips its drain.
        request.protocol.force_close()
    seconds = time.perf_counter() - started
    route = _route(request)
    metrics.observe_request(
        method=request.method,
        endpoint=route,
        status=status,
        seconds=seconds,
        error_type=error_type,
    )
    log.info(
        "request_failed" if error_type else "request_completed",
        request_id=request_id,
        method=request.method,
        route=route,
        status=status,
        duration_ms=round(seconds * 1000, 3),
        images=request.get(IMAGE_COUNT, 0),
        **({"error_type": error_type} if error_type else {}),
    )
    return response
