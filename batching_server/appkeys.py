"""Typed ``web.AppKey``s: what the app holds, shared by the wiring and the handlers."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from opentelemetry import trace

from .batcher import Batcher
from .metrics import ServiceMetrics
from .model import Classifier, ImageInput, Ranked
from .preprocess import Preprocessor
from .readiness import Readiness
from .settings import Settings

__all__ = [
    "BATCHER",
    "CLASSIFIER",
    "IMAGE_COUNT",
    "METRICS",
    "PREPROCESSOR",
    "PREPROCESS_POOL",
    "READINESS",
    "REQUEST_ID",
    "SETTINGS",
    "TRACER",
    "UPLOAD_SLOTS",
]

SETTINGS = web.AppKey("settings", Settings)
READINESS = web.AppKey("readiness", Readiness)
CLASSIFIER = web.AppKey("classifier", Classifier)
PREPROCESSOR = web.AppKey("preprocessor", Preprocessor)
PREPROCESS_POOL = web.AppKey("preprocess_pool", ThreadPoolExecutor)
BATCHER = web.AppKey("batcher", Batcher[ImageInput, Ranked])

METRICS = web.AppKey("metrics", ServiceMetrics)
TRACER = web.AppKey("tracer", trace.Tracer)
UPLOAD_SLOTS = web.AppKey("upload_slots", asyncio.Semaphore)

REQUEST_ID = web.RequestKey("request_id", str)
IMAGE_COUNT = web.RequestKey("image_count", int)
