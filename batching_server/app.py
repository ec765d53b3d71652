"""``create_app()``: routes, middlewares, and the lifecycles of pools, model and batcher.

Start-up order (``cleanup_ctx`` unwinds it in reverse on shutdown): preprocessing pool,
model (loaded, then warmed up in the background), batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import structlog
from aiohttp import web

from .appkeys import BATCHER, CLASSIFIER, PREPROCESS_POOL, PREPROCESSOR, READINESS, SETTINGS
from .batcher import Batcher
from .handlers import ROUTES
from .middlewares import request_context_middleware
from .model import Classifier, default_thread_count, load_classifier
from .preprocess import Preprocessor
from .readiness import Readiness
from .settings import Settings

__all__ = ["create_app"]

log = structlog.get_logger(__name__)


def create_app(settings: Settings, *, classifier: Classifier | None = None) -> web.Application:
    """Build the application; pass ``classifier`` to share one loaded model (tests do)."""
    app = web.Application(
        middlewares=[request_context_middleware],
        # uploads.py streams and counts multipart bodies itself; this cap guards only
        # request.read()/post(), which no route uses, so it simply follows the same limit.
        client_max_size=settings.limits.max_upload_bytes,
    )
    app[SETTINGS] = settings
    app[READINESS] = Readiness()
    app[PREPROCESSOR] = Preprocessor(
        weights=settings.model.weights, max_image_pixels=settings.limits.max_image_pixels
    )
    app.add_routes(ROUTES)
    app.cleanup_ctx.append(_preprocess_pool_ctx)
    app.cleanup_ctx.append(_model_ctx(classifier))
    app.cleanup_ctx.append(_batcher_ctx)
    app.on_shutdown.append(_mark_shutting_down)
    return app


async def _preprocess_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    # Decoding is CPU-bound and releases the GIL: one thread per core keeps every core busy.
    pool = ThreadPoolExecutor(max_workers=default_thread_count(), thread_name_prefix="preprocess")
    app[PREPROCESS_POOL] = pool
    yield
    pool.shutdown(wait=True, cancel_futures=True)


def _model_ctx(
    injected: Classifier | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def model_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        readiness = app[READINESS]
        readiness.mark_not_ready("loading the model")
        if injected is not None:
            classifier = injected
        else:
            classifier = await asyncio.to_thread(
                load_classifier,
                settings.model,
                max_concurrent_batches=settings.batching.max_concurrent_batches,
            )
        app[CLASSIFIER] = classifier
        warmup = asyncio.create_task(_warm_up(app, classifier), name="model-warmup")
        try:
            yield
        finally:
            warmup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warmup
            if injected is None:
                await asyncio.to_thread(classifier.close)

    return model_ctx


async def _warm_up(app: web.Application, classifier: Classifier) -> None:
    settings = app[SETTINGS]
    readiness = app[READINESS]
    if settings.model.warmup:
        readiness.mark_not_ready("warming up the model")
        sizes = range(1, settings.batching.max_batch_size + 1)
        try:
            seconds = await classifier.warmup(sizes)
        except Exception as exc:
            log.exception("warmup_failed")
            readiness.mark_failed(f"warm-up failed: {type(exc).__name__}")
            return
        log.info("warmup_done", batch_sizes=len(sizes), seconds=round(seconds, 3))
    readiness.mark_ready()
    log.info("ready")


async def _batcher_ctx(app: web.Application) -> AsyncIterator[None]:
    batching = app[SETTINGS].batching
    batcher = Batcher(
        app[CLASSIFIER].predict_batch,
        max_batch_size=batching.max_batch_size,
        max_wait_s=batching.max_wait_ms / 1000,
        max_queue_size=batching.max_queue_size,
        max_concurrent_batches=batching.max_concurrent_batches,
    )
    batcher.start()
    app[BATCHER] = batcher
    yield
    # Runs after aiohttp has waited for in-flight handlers; drains anything still queued.
    await batcher.close()


async def _mark_shutting_down(app: web.Application) -> None:
    app[READINESS].mark_not_ready("shutting down")
