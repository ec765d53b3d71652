"""Operational endpoints: liveness, readiness, the Prometheus scrape and the service summary."""

from __future__ import annotations

import time
from pathlib import Path

from aiohttp import web

from .. import __version__
from .appkeys import METRICS, MODEL_SPEC, READINESS, RUNNER, SETTINGS, WORKER
from .responses import json_response
from .routes import ROUTES, RouteTable

__all__ = ["health", "index", "metrics", "metrics_routes", "ready", "routes"]

routes = RouteTable()
# On the API port, or on a port of their own (metrics.port).
metrics_routes = RouteTable()


@routes.get("/health", summary="liveness", public=True, traced=False)
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


@routes.get("/ready", summary="readiness (model loaded and warmed up)", public=True, traced=False)
async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 once the model is loaded and warmed up, else 503 with the reason.

    A worker among several answers for the fleet: 200 only when every worker is warmed up.
    """
    readiness = request.app[READINESS]
    worker = request.app.get(WORKER)
    fleet_ready = worker is None or worker.fleet.ready
    if readiness.ready and fleet_ready:
        return json_response({"status": "ready", "model_loaded": True, "timestamp": time.time()})
    reason = readiness.reason if not readiness.ready or worker is None else worker.fleet.reason
    return json_response(
        {
            "status": "not_ready",
            "model_loaded": RUNNER in request.app,
            "reason": reason,
            "timestamp": time.time(),
        },
        status=503,
    )


@metrics_routes.get("/metrics", summary="Prometheus metrics", public=True, traced=False)
async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of this app's registry."""
    body, headers = request.app[METRICS].render(request.headers.getall("Accept", []))
    return web.Response(body=body, headers=headers)


# Protected when auth.api_keys is set: it describes the model and the limits, which a caller
# without a key has no need to learn.
@routes.get("/", summary="this summary")
async def index(request: web.Request) -> web.Response:
    """Service name, version, a settings summary and the endpoints."""
    settings = request.app[SETTINGS]
    runner = request.app.get(RUNNER)
    endpoints = {route.name: route.summary for route in request.app[ROUTES].values()}
    if settings.metrics.port:
        endpoints["GET /metrics"] = f"Prometheus metrics, on port {settings.metrics.port}"
    return json_response(
        {
            "service": "batching_server",
            "version": __version__,
            "model": {
                "name": request.app[MODEL_SPEC].name,
                # A checkpoint's file name only: its directory tells a caller about the host.
                "weights": Path(settings.model.weights).name,
                "device": str(runner.device) if runner else None,
                "classes": len(runner.labels) if runner else None,
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
            "endpoints": endpoints,
        }
    )
