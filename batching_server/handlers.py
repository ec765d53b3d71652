"""HTTP endpoints: read uploads, preprocess off the loop, await the batcher, answer JSON."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from aiohttp import web
from opentelemetry import trace

from . import __version__
from .appkeys import (
    BATCHER,
    CLASSIFIER,
    IMAGE_COUNT,
    METRICS,
    PREPROCESS_POOL,
    PREPROCESSOR,
    READINESS,
    REQUEST_ID,
    SETTINGS,
    TRACER,
    UPLOAD_SLOTS,
)
from .errors import BadRequestError, DeadlineExceededError, NotReadyError, ServiceError
from .model import ImageInput, Ranked
from .preprocess import Preprocessor
from .responses import json_response
from .uploads import Upload, read_uploads

__all__ = ["METRICS_ROUTES", "ROUTES", "health", "index", "metrics", "predict", "ready"]


DEADLINE_HEADER = "X-Request-Timeout"


def _timeout_s(request: web.Request, configured: float) -> float:
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
            f"{DEADLINE_HEADER} must be a positive number of seconds, got {raw!r}"
        )
    return min(asked, configured)


def _top_k(request: web.Request, num_classes: int) -> int | None:
    raw = request.query.get("top_k")
    if raw is None:
        return None
    k = int(raw) if raw.isdigit() else 0
    if not 1 <= k <= num_classes:
        raise BadRequestError(f"top_k must be an integer from 1 to {num_classes}, got {raw!r}")
    return k


def _timed_preprocess(
    preprocessor: Preprocessor, data: bytes
) -> tuple[torch.Tensor | ServiceError, float]:
    # Runs in the pool. Rejected images are timed too: junk costs decode time as well.
    started = time.perf_counter()
    try:
        result: torch.Tensor | ServiceError = preprocessor(data)
    except ServiceError as exc:
        result = exc
    return result, time.perf_counter() - started


async def _preprocess(request: web.Request, upload: Upload) -> torch.Tensor:
    app = request.app
    loop = asyncio.get_running_loop()
    with app[TRACER].start_as_current_span(
        "image.preprocess",
        attributes={"image.index": upload.index, "image.bytes": len(upload.data)},
    ):
        result, seconds = await loop.run_in_executor(
            app[PREPROCESS_POOL], _timed_preprocess, app[PREPROCESSOR], upload.data
        )
        # Observed here, on the loop: aioprometheus is not thread-safe.
        app[METRICS].preprocess_duration.add({}, seconds)
        if isinstance(result, ServiceError):
            raise result
    return result


async def _read_and_preprocess(request: web.Request) -> list[torch.Tensor]:
    """Tensors for every ``file`` part, in order; decoding starts as each part arrives."""
    limits = request.app[SETTINGS].limits
    uploads: list[Upload] = []
    tasks: list[asyncio.Task[torch.Tensor]] = []
    try:
        async for upload in read_uploads(
            request,
            max_upload_bytes=limits.max_upload_bytes,
            max_files=limits.max_files_per_request,
        ):
            uploads.append(upload)
            request[IMAGE_COUNT] = len(uploads)
            tasks.append(asyncio.create_task(_preprocess(request, upload)))
        tensors = []
        for upload, task in zip(uploads, tasks, strict=True):
            try:
                tensors.append(await task)
            except ServiceError as exc:
                if len(uploads) > 1:
                    name = f" ({upload.filename})" if upload.filename else ""
                    exc.message = f"file {upload.index + 1}{name}: {exc.message}"
                raise
        return tensors
    finally:
        # A bad part or a gone client: decodes not yet started need not run.
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def _upload_slot(request: web.Request, timeout_s: float) -> AsyncIterator[None]:
    """Hold one of ``limits.max_concurrent_uploads`` while reading and decoding."""
    slots = request.app[UPLOAD_SLOTS]
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


async def predict(request: web.Request) -> web.Response:
    """Classify each uploaded ``file`` part; each part is one batch item."""
    started = time.monotonic()
    app = request.app
    readiness = app[READINESS]
    if not readiness.ready:
        raise NotReadyError(f"the server is not ready: {readiness.reason}")
    settings, classifier = app[SETTINGS], app[CLASSIFIER]
    top_k = _top_k(request, len(classifier.labels))
    timeout_s = _timeout_s(request, settings.batching.request_timeout_s)
    request_id = request[REQUEST_ID]

    batcher = app[BATCHER]
    # Until its images are queued, this request may still join a partial batch.
    with batcher.expecting():
        async with _upload_slot(request, timeout_s):
            tensors = await _read_and_preprocess(request)
    remaining = timeout_s - (time.monotonic() - started)
    if remaining <= 0:
        raise DeadlineExceededError(
            f"the request deadline of {timeout_s} s passed before inference"
        )
    request_span = trace.get_current_span().get_span_context()
    inputs = [
        ImageInput(pixels=t, request_id=request_id, span_context=request_span, top_k=top_k or 1)
        for t in tensors
    ]
    with app[TRACER].start_as_current_span("batcher.wait", attributes={"images": len(inputs)}):
        ranked = await batcher.submit_many(inputs, timeout_s=remaining)

    app[METRICS].observe_predictions([labels[0] for labels in ranked])
    results = [_result(labels, top_k) for labels in ranked]
    if len(results) == 1:
        body: dict[str, Any] = {**results[0], "request_id": request_id}
    else:
        body = {"predictions": results, "request_id": request_id}
    return json_response(body)


async def health(request: web.Request) -> web.Response:
    """Liveness: 200 while the process can serve, 503 once it has failed for good."""
    readiness = request.app[READINESS]
    if readiness.failed:
        # A stalled model: the process is about to exit; a restart is the cure.
        return json_response(
            {"status": "unhealthy", "reason": readiness.reason, "timestamp": time.time()},
            status=503,
        )
    return json_response({"status": "healthy", "timestamp": time.time()})


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 once the model is loaded and warmed up, else 503 with the reason."""
    readiness = request.app[READINESS]
    if readiness.ready:
        return json_response({"status": "ready", "model_loaded": True, "timestamp": time.time()})
    return json_response(
        {
            "status": "not_ready",
            "model_loaded": CLASSIFIER in request.app,
            "reason": readiness.reason,
            "timestamp": time.time(),
        },
        status=503,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of this app's registry."""
    body, headers = request.app[METRICS].render(request.headers.getall("Accept", []))
    return web.Response(body=body, headers=headers)


async def index(request: web.Request) -> web.Response:
    """Service name, version, a settings summary and the endpoints."""
    settings = request.app[SETTINGS]
    classifier = request.app.get(CLASSIFIER)
    return json_response(
        {
            "service": "batching_server",
            "version": __version__,
            "model": {
                "name": "resnet50",
                "weights": settings.model.weights,
                "device": str(classifier.device) if classifier else None,
                "classes": len(classifier.labels) if classifier else None,
            },
            "batching": {
                "max_batch_size": settings.batching.max_batch_size,
                "max_wait_ms": settings.batching.max_wait_ms,
                "max_queue_size": settings.batching.max_queue_size,
                "request_timeout_s": settings.batching.request_timeout_s,
            },
            "limits": {
                "max_upload_bytes": settings.limits.max_upload_bytes,
                "max_image_pixels": settings.limits.max_image_pixels,
                "max_files_per_request": settings.limits.max_files_per_request,
            },
            "endpoints": {
                "POST /predict": "classify images: multipart field 'file', optional ?top_k=N",
                "GET /health": "liveness",
                "GET /ready": "readiness (model loaded and warmed up)",
                "GET /metrics": (
                    f"Prometheus metrics, on port {settings.metrics.port}"
                    if settings.metrics.port
                    else "Prometheus metrics"
                ),
                "GET /": "this summary",
            },
        }
    )


ROUTES = [
    web.post("/predict", predict),
    web.get("/health", health, allow_head=False),
    web.get("/ready", ready, allow_head=False),
    web.get("/", index, allow_head=False),
]
# On the API port, or on a port of their own (metrics.port).
METRICS_ROUTES = [web.get("/metrics", metrics, allow_head=False)]
