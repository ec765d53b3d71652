"""Typed ``web.AppKey``s: what the app holds, shared by the wiring and the handlers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from aiohttp import web

from .batcher import Batcher
from .model import Classifier, ImageInput
from .preprocess import Preprocessor
from .readiness import Readiness
from .settings import Settings

__all__ = [
    "BATCHER",
    "CLASSIFIER",
    "PREPROCESSOR",
    "PREPROCESS_POOL",
    "READINESS",
    "REQUEST_ID",
    "SETTINGS",
]

SETTINGS = web.AppKey("settings", Settings)
READINESS = web.AppKey("readiness", Readiness)
CLASSIFIER = web.AppKey("classifier", Classifier)
PREPROCESSOR = web.AppKey("preprocessor", Preprocessor)
PREPROCESS_POOL = web.AppKey("preprocess_pool", ThreadPoolExecutor)
BATCHER = web.AppKey("batcher", Batcher[ImageInput, torch.Tensor])

REQUEST_ID = web.RequestKey("request_id", str)
