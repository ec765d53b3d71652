"""Typed ``web.AppKey``s: what the app holds, shared by the wiring and the handlers."""

from __future__ import annotations

import asyncio

from aiohttp import web
from opentelemetry import trace

from ..core.batcher import Batcher
from ..core.fleet import WorkerRole
from ..core.readiness import Readiness
from ..models.background_compile import BackgroundCompile
from ..models.runner import ImageInput, ModelRunner, Prediction
from ..models.spec import ModelSpec
from ..observability.metrics import ServiceMetrics
from ..preprocess.pool import DecodePool
from ..settings import Settings

__all__ = [
    "BATCHER",
    "DECODE_POOL",
    "IMAGE_COUNT",
    "METRICS",
    "MODEL_COMPILE",
    "MODEL_SPEC",
    "READINESS",
    "REQUEST_ID",
    "RUNNER",
    "SETTINGS",
    "TRACER",
    "UPLOAD_SLOTS",
    "WORKER",
]

SETTINGS = web.AppKey("settings", Settings)
READINESS = web.AppKey("readiness", Readiness)
MODEL_SPEC = web.AppKey("model_spec", ModelSpec)
RUNNER = web.AppKey("runner", ModelRunner)
DECODE_POOL = web.AppKey("decode_pool", DecodePool)
BATCHER = web.AppKey("batcher", Batcher[ImageInput, Prediction])
# Set only when the app loads the model itself (no runner passed in).
MODEL_COMPILE = web.AppKey("model_compile", BackgroundCompile)

METRICS = web.AppKey("metrics", ServiceMetrics)
TRACER = web.AppKey("tracer", trace.Tracer)
UPLOAD_SLOTS = web.AppKey("upload_slots", asyncio.Semaphore)
# Set only in a worker among several (server.workers > 1).
WORKER = web.AppKey("worker", WorkerRole)

REQUEST_ID = web.RequestKey("request_id", str)
IMAGE_COUNT = web.RequestKey("image_count", int)
