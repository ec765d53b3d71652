"""``POST /predict``: read uploads, decode them off the loop, await the batcher, answer JSON."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from opentelemetry import trace

from ..core.errors import (
    BadRequestError,
    DeadlineExceededError,
    NotReadyError,
    RequestTimeoutError,
    ServiceError,
)
from ..models.runner import ImageInput, Ranked
from .appkeys import (
    BATCHER,
    DECODE_POOL,
    IMAGE_COUNT,
    METRICS,
    READINESS,
    REQUEST_ID,
    RUNNER,
    SETTINGS,
    TRACER,
    UPLOAD_SLOTS,
)
from .responses import json_response
from .routes import RouteTable
from .uploads import Upload, read_uploads

__all__ = [
    "DEADLINE_HEADER",
    "await_decodes",
    "decode_upload",
    "predict",
    "request_timeout_s",
    "routes",
    "upload_slot",
]

DEADLINE_HEADER = "X-Request-Timeout"

routes = RouteTable()


def request_timeout_s(request: web.Request, configured: float) -> float:
    """The request's deadline: the client's ``X-Request-Timeout`` when shorter."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return configured
    try:
        asked = float(raw)
    except ValueError:
        asked = float("nan")
    if not 0 < asked < float("inf"):
        raise BadRequestError(
            f"{DEADLINE_HEADER} must be a positive number of seconds, got {_shown(raw)}"
        )
    return min(asked, configured)


def _top_k(request: web.Request, num_classes: int) -> int | None:
    raw = request.query.get("top_k")
    if raw is None:
        return None
    # ASCII digits only (str.isdigit() also accepts '²', which int() refuses), and no more of
    # them than the class count has: int() refuses thousands of digits, and costs time on them.
    plain = raw.isascii() and raw.isdigit() and len(raw) <= len(str(num_classes))
    k = int(raw) if plain else 0
    if not 1 <= k <= num_classes:
        raise BadRequestError(
            f"top_k must be an integer from 1 to {num_classes}, got {_shown(raw)}"
        )
    return k


def _shown(raw: str) -> str:
    """``raw`` quoted for an error message, cut short: the client sent it, it can be long."""
    return repr(raw) if len(raw) <= 40 else f"{raw[:40]!r}... ({len(raw)} characters)"


async def decode_upload(app: web.Application, upload: Upload, deadline: float) -> Any:
    """The model input for one upload, decoded in the pool and timed (a span and a metric)."""
    with app[TRACER].start_as_current_span(
        "image.preprocess",
        attributes={"image.index": upload.index, "image.bytes": len(upload.data)},
    ):
        result, seconds = await app[DECODE_POOL].decode(upload.data, deadline=deadline)
        if isinstance(result, DeadlineExceededError):
            raise result  # skipped, never decoded: nothing to time
        # Observed here, on the loop: aioprometheus is not thread-safe.
        app[METRICS].preprocess_duration.add({}, seconds)
        if isinstance(result, ServiceError):
            raise result
    return result


async def await_decodes(
    uploads: list[Upload], tasks: list[asyncio.Task[Any]], deadline: float, *, noun: str
) -> list[Any]:
    """Each upload's model input, in order, by ``deadline`` (else 504); a failing one's error
    names it (``noun`` and number) when the request holds several."""
    pixels = []
    try:
        async with asyncio.timeout(deadline - time.monotonic()):
            for upload, task in zip(uploads, tasks, strict=True):
                try:
                    pixels.append(await task)
                except ServiceError as exc:
                    if len(uploads) > 1:
                        name = f" ({upload.filename})" if upload.filename else ""
                        exc.message = f"{noun} {upload.index + 1}{name}: {exc.message}"
                    raise
    except TimeoutError:
        raise DeadlineExceededError(
            "the request deadline passed before its images were decoded"
        ) from None
    return pixels


async def _read_and_decode(request: web.Request, deadline: float) -> list[Any]:
    """Model inputs for every ``file`` part, in order; decoding starts as each part arrives.

    ``deadline`` (``time.monotonic()``) bounds both: a body still arriving then is a 408,
    an image still waiting for or in its decode a 504.
    """
    limits = request.app[SETTINGS].limits
    uploads: list[Upload] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        try:
            # The whole body, not each read: a client that sends a byte now and then would
            # otherwise hold its upload slot for as long as it likes.
            async with asyncio.timeout(deadline - time.monotonic()):
                async for upload in read_uploads(
                    request,
                    max_upload_bytes=limits.max_upload_bytes,
                    max_files=limits.max_files_per_request,
                ):
                    uploads.append(upload)
                    request[IMAGE_COUNT] = len(uploads)
                    tasks.append(asyncio.create_task(decode_upload(request.app, upload, deadline)))
        except TimeoutError:
            raise RequestTimeoutError(
                "the request deadline passed before the whole request body arrived "
                "(batching.request_timeout_s, or a shorter X-Request-Timeout)"
            ) from None
        return await await_decodes(uploads, tasks, deadline, noun="file")
    finally:
        # A bad part or a gone client: decodes not yet started need not run.
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def upload_slot(app: web.Application, timeout_s: float) -> AsyncIterator[None]:
    """Hold one of ``limits.max_concurrent_uploads`` while reading and decoding."""
    slots = app[UPLOAD_SLOTS]
    try:
        async with asyncio.timeout(timeout_s):
            await slots.acquire()
    except TimeoutError:
        raise DeadlineExceededError(
            f"the request deadline of {timeout_s} s passed while waiting for an upload slot "
            "(limits.max_concurrent_uploads)"
        ) from None
    try:
        yield
    finally:
        slots.release()


def _result(ranked: Ranked, top_k: int | None) -> dict[str, Any]:
    # ``ranked`` holds exactly the labels the request asked for (one without ``top_k``).
    label, confidence = ranked[0]
    result: dict[str, Any] = {"prediction": label, "confidence": confidence}
    if top_k is not None:
        result["top_k"] = [{"label": name, "confidence": score} for name, score in ranked]
    return result


@routes.post("/predict", summary="classify images: multipart field 'file', optional ?top_k=N")
async def predict(request: web.Request) -> web.Response:
    """Classify each uploaded ``file`` part; each part is one batch item."""
    started = time.monotonic()
    app = request.app
    readiness = app[READINESS]
    if not readiness.ready:
        raise NotReadyError(f"the server is not ready: {readiness.reason}")
    settings = app[SETTINGS]
    top_k = _top_k(request, len(app[RUNNER].labels))
    timeout_s = request_timeout_s(request, settings.batching.request_timeout_s)
    request_id = request[REQUEST_ID]

    batcher = app[BATCHER]
    # Until its images are queued, this request may still join a partial batch.
    with batcher.expecting():
        async with upload_slot(app, timeout_s):
            pixels = await _read_and_decode(request, started + timeout_s)
    remaining = timeout_s - (time.monotonic() - started)
    if remaining <= 0:
        raise DeadlineExceededError(
            f"the request deadline of {timeout_s} s passed before inference"
        )
    request_span = trace.get_current_span().get_span_context()
    inputs = [
        ImageInput(pixels=p, request_id=request_id, span_context=request_span, top_k=top_k or 1)
        for p in pixels
    ]
    with app[TRACER].start_as_current_span("batcher.wait", attributes={"images": len(inputs)}):
        predictions = await batcher.submit_many(inputs, timeout_s=remaining)
    ranked = [prediction.ranked for prediction in predictions]

    app[METRICS].observe_predictions([labels[0] for labels in ranked])
    results = [_result(labels, top_k) for labels in ranked]
    if len(results) == 1:
        body: dict[str, Any] = {**results[0], "request_id": request_id}
    else:
        body = {"predictions": results, "request_id": request_id}
    return json_response(body)
