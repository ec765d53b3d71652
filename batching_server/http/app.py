"""``create_app()``: routes, middlewares, and the lifecycles of pools, model and batcher.

Start-up order (``cleanup_ctx`` unwinds it in reverse on shutdown): tracing, loop lag,
decode pool, stall watchdog, model (loaded, then warmed up in the background), batcher. So on
shutdown the batcher drains first, under the watchdog (a pass that hangs during the drain is
a stall like any other, and so is a hung warm-up pass), and the spans of its last batches are
flushed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from .. import __version__
from ..core.batcher import Batcher
from ..core.errors import ModelStalledError
from ..core.fleet import WorkerRole
from ..core.readiness import ExitCode, Readiness
from ..core.shapes import warmup_sizes
from ..core.watchdog import PassTimer, StallWatchdog
from ..models.background_compile import BackgroundCompile
from ..models.loading import compile_runner, compiled_or_failed, load_runner
from ..models.runner import ModelRunner
from ..models.spec import ModelSpec
from ..models.threads import (
    DECODE_NICENESS,
    MODEL_NICENESS,
    available_cores,
    configure_worker_thread,
    run_in_passing_thread,
)
from ..models.torchvision_spec import torchvision_classifier
from ..observability.logs import configure_logging
from ..observability.metrics import ServiceMetrics
from ..observability.shared_metrics import MetricFiles
from ..observability.tracing import (
    WorkerSpanAttribute,
    create_tracer_provider,
    server_span_middleware,
    traced_batch_function,
)
from ..preprocess.pool import DecodePool
from ..preprocess.preprocessor import Preprocessor
from ..settings import Settings
from . import oip, predict, probes
from .appkeys import (
    BATCHER,
    DECODE_POOL,
    METRICS,
    MODEL_COMPILE,
    MODEL_SPEC,
    READINESS,
    RUNNER,
    SETTINGS,
    TRACER,
    UPLOAD_SLOTS,
    WORKER,
)
from .auth import bearer_auth_middleware
from .middlewares import request_context_middleware
from .routes import add_routes, route_of

__all__ = ["WORKER_HEADER", "create_app", "create_metrics_app"]

log = structlog.get_logger(__name__)

# Names the worker process that answered, when there are several (server.workers > 1).
WORKER_HEADER = "X-Worker"


@dataclass(slots=True)
class _Lifecycle:
    """State the lifecycle hooks share: the clock, warm-up passes, when shutdown began."""

    clock: Callable[[], float]
    warmup_passes: PassTimer
    shutdown_started: float | None = field(default=None)


# Set once in create_app, before the app freezes; its fields change as the app runs.
_LIFECYCLE = web.AppKey("lifecycle", _Lifecycle)


def create_app(
    settings: Settings,
    *,
    runner: ModelRunner | None = None,
    tracer_provider: TracerProvider | None = None,
    spec: ModelSpec | None = None,
    clock: Callable[[], float] = time.monotonic,
    worker: WorkerRole | None = None,
) -> web.Application:
    """Build the application.

    Pass ``runner`` to share one loaded model (its thread plan then sets how many
    batches run at once), or ``tracer_provider`` to collect spans elsewhere (tests do both);
    the app then leaves their shutdown to the caller. ``clock`` times batches and warm-up
    passes for the batcher and the stall watchdog (tests pass a fake one). ``worker`` makes
    it one worker among several (server.workers > 1): see ``_as_worker``.
    """
    spec = spec or torchvision_classifier(settings.model.name)
    provider = tracer_provider or create_tracer_provider(settings.tracing)
    middlewares: list[Middleware] = []
    if provider is not None:
        # Outermost, so the request log line and error handling run inside the server span.
        middlewares.append(server_span_middleware(provider, _traced(settings)))
    middlewares.append(request_context_middleware)
    if settings.auth.api_keys:
        middlewares.append(bearer_auth_middleware(settings.auth.api_keys))
    app = web.Application(
        middlewares=middlewares,
        # uploads.py streams and counts multipart bodies itself; this cap guards only
        # request.read()/post(), which no route uses, so it simply follows the same limit.
        client_max_size=settings.limits.max_upload_bytes,
    )
    app[SETTINGS] = settings
    app[MODEL_SPEC] = spec
    app[READINESS] = Readiness()
    app[_LIFECYCLE] = _Lifecycle(clock=clock, warmup_passes=PassTimer(clock=clock))
    # Bodies are read and decoded only this many requests at a time; the others wait unread
    # (TCP holds them back), so memory stays under this x limits.max_upload_bytes.
    app[UPLOAD_SLOTS] = asyncio.Semaphore(settings.limits.max_concurrent_uploads)
    app[METRICS] = ServiceMetrics(
        model_name=spec.name,
        max_batch_size=settings.batching.max_batch_size,
        batch_sizes=settings.batching.batch_sizes,
        files=_metric_files(worker),
    )
    if worker is not None:
        _as_worker(app, worker, provider)
    app[TRACER] = (
        provider.get_tracer("batching_server", __version__) if provider else trace.NoOpTracer()
    )
    add_routes(app, predict.routes)
    add_routes(app, probes.routes)
    add_routes(app, oip.routes)
    if not settings.metrics.port:
        add_routes(app, probes.metrics_routes)
    if provider is not None and tracer_provider is None:
        app.cleanup_ctx.append(_tracing_ctx(provider))
    app.cleanup_ctx.append(_loop_lag_ctx)
    app.cleanup_ctx.append(_decode_pool_ctx)
    # Before the model and the batcher, so that it is stopped after them: it watches the
    # warm-up passes and the drain.
    if settings.model.stall_timeout_s:
        app.cleanup_ctx.append(_watchdog_ctx)
    app.cleanup_ctx.append(_model_ctx(runner))
    app.cleanup_ctx.append(_batcher_ctx)
    app.on_shutdown.append(_mark_shutting_down)
    return app


def _metric_files(worker: WorkerRole | None) -> MetricFiles | None:
    if worker is None:
        return None
    return MetricFiles(
        directory=worker.metrics_dir,
        # Counts outlive the process: its replacement writes files of its own.
        process_id=f"{worker.index}-{os.getpid()}",
        worker_id=str(worker.index),
    )


def _as_worker(app: web.Application, worker: WorkerRole, provider: TracerProvider | None) -> None:
    """Name the worker on every response and span; /ready then also asks the fleet."""
    app[WORKER] = worker
    header = str(worker.index)

    async def name_the_worker(_: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = header

    app.on_response_prepare.append(name_the_worker)
    if provider is not None:
        provider.add_span_processor(WorkerSpanAttribute(worker.index))


def _traced(settings: Settings) -> Callable[[web.Request], bool]:
    extra = frozenset(settings.tracing.excluded_paths)

    def traced(request: web.Request) -> bool:
        route = route_of(request)
        return (route is None or route.traced) and request.path not in extra

    return traced


def _tracing_ctx(provider: TracerProvider) -> Callable[[web.Application], AsyncIterator[None]]:
    async def tracing_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        # Flushes buffered spans; bounded by the exporter's own timeout.
        await asyncio.to_thread(provider.shutdown)

    return tracing_ctx


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    watcher = asyncio.create_task(app[METRICS].watch_loop_lag(), name="loop-lag")
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


def _niceness(app: web.Application, niceness: int) -> int:
    return niceness if app[SETTINGS].server.low_priority_workers else 0


async def _decode_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    spec = app[MODEL_SPEC]
    pool = DecodePool(
        preprocessor=Preprocessor(
            transform=spec.transform(settings.model.weights),
            max_image_pixels=settings.limits.max_image_pixels,
            max_pixels_in_flight=settings.limits.max_decode_pixels_in_flight,
            jpeg_draft=settings.preprocess.jpeg_draft,
            fast_resize=settings.preprocess.fast_resize,
        ),
        threads=settings.preprocess.threads or available_cores(),
        # One torch thread per worker: the pool already spreads images over the cores, and
        # more would fight the model thread for them.
        initializer=functools.partial(
            configure_worker_thread,
            torch_threads=1,
            niceness=_niceness(app, DECODE_NICENESS),
        ),
    )
    app[DECODE_POOL] = pool
    yield
    pool.close()


def _model_ctx(
    injected: ModelRunner | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def model_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        readiness = app[READINESS]
        readiness.mark_not_ready("loading the model")
        if injected is not None:
            runner = injected
        else:
            runner = await run_in_passing_thread(
                load_runner,
                settings.model,
                batching=settings.batching,
                spec=app[MODEL_SPEC],
                niceness=_niceness(app, MODEL_NICENESS),
                preprocess=settings.preprocess,
                limits=settings.limits,
            )
        app[RUNNER] = runner
        # The runner decides (preprocess.device): JPEGs stay encoded only for a runner that
        # can decode them. Set before readiness, so before any upload is decoded.
        app[DECODE_POOL].preprocessor.keep_jpegs_encoded = runner.device_preprocessor is not None
        app[METRICS].describe_model(
            weights=settings.model.weights,
            device=str(runner.device),
            precision=runner.precision,
            parameter_bytes=runner.forward_pass.parameter_bytes,
            compiled=lambda: runner.forward_pass.compiled,
        )
        if injected is None:
            # Started by the warm-up once the server is ready, when a start on a CPU found
            # graphs missing from the cache (model.compile = auto).
            worker = app.get(WORKER)
            app[MODEL_COMPILE] = BackgroundCompile(
                runner=runner,
                spec=app[MODEL_SPEC],
                settings=settings.model,
                batching=settings.batching,
                # The build process logs as this one does, on the same stdout.
                log_setup=functools.partial(
                    configure_logging,
                    level=settings.logging.level,
                    fmt=settings.logging.format,
                    fields={"worker": worker.index} if worker is not None else None,
                ),
            )
        warmup = asyncio.create_task(
            _warm_up(app, runner, compile=injected is None), name="model-warmup"
        )
        try:
            yield
        finally:
            warmup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warmup
            if (background := app.get(MODEL_COMPILE)) is not None:
                # Never waited for: a build takes minutes, a drain must not.
                background.abandon()
            if injected is None:
                await asyncio.to_thread(runner.close)

    return model_ctx


async def _warm_up(app: web.Application, runner: ModelRunner, *, compile: bool) -> None:
    settings = app[SETTINGS]
    readiness = app[READINESS]
    build_later = False
    if compile and settings.model.compile != "false":
        # After the port opens, so /health answers while a first start compiles (minutes).
        readiness.mark_not_ready("compiling the model")
        try:
            await run_in_passing_thread(
                compile_runner, runner, settings.model, batching=settings.batching
            )
            build_later = True  # if graphs are missing and auto leaves them for later
        except Exception as exc:
            log.exception("compile_failed")
            if compiled_or_failed(settings.model):
                readiness.mark_failed(f"compiling the model failed: {type(exc).__name__}")
                return
            # auto: the eager model serves the same answers, only slower.
    if settings.model.warmup:
        readiness.mark_not_ready("warming up the model")
        sizes = warmup_sizes(settings.batching.max_batch_size, settings.batching.batch_sizes)
        passes = app[_LIFECYCLE].warmup_passes
        seconds = 0.0
        try:
            # One shape at a time, each timed on its own: a hung pass is a stall, while the
            # whole warm-up may rightly take longer than model.stall_timeout_s.
            for size in sizes:
                with passes.running():
                    seconds += await runner.warmup([size])
        except Exception as exc:
            log.exception("warmup_failed")
            readiness.mark_failed(f"warm-up failed: {type(exc).__name__}")
            return
        log.info("warmup_done", batch_sizes=len(sizes), seconds=round(seconds, 3))
    # Everything alive now (torch, the model, compiled graphs) lives as long as the process:
    # out of the collector's reach, a full collection no longer walks millions of objects
    # with every thread stopped, a pause every request would feel.
    gc.collect()
    gc.freeze()
    readiness.mark_ready()
    log.info("ready")
    if build_later and (background := app.get(MODEL_COMPILE)) is not None:
        # After ready and after warm-up: the eager model serves while it builds.
        background.start()


async def _batcher_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    batching = settings.batching
    readiness = app[READINESS]
    lifecycle = app[_LIFECYCLE]
    runner = app[RUNNER]

    def on_failure(exc: BaseException) -> None:
        # Every request would now fail: say so on /ready and /health, and exit (see
        # __main__) so that the supervisor restarts the process.
        readiness.mark_failed(
            f"the batcher stopped: {type(exc).__name__}", exit_code=ExitCode.BATCHER_FAILED
        )

    batch_fn = traced_batch_function(
        runner.predict_batch,
        tracer=app[TRACER],
        model_name=runner.name,
        device=str(runner.device),
    )
    batcher = Batcher(
        batch_fn,
        max_batch_size=batching.max_batch_size,
        max_wait_s=batching.max_wait_ms / 1000,
        max_queue_size=batching.max_queue_size,
        # As many batches in flight as the model has threads for them (its thread plan).
        max_concurrent_batches=runner.threads.concurrent_batches,
        observer=app[METRICS],
        dispatch_when_idle=batching.dispatch_when_idle,
        clock=lifecycle.clock,
        on_failure=on_failure,
    )
    batcher.start()
    app[BATCHER] = batcher
    yield
    # Runs after aiohttp has waited for in-flight handlers; drains anything still queued,
    # within what is left of the drain's time since shutdown began.
    timeout_s = settings.server.graceful_shutdown_timeout_s
    if lifecycle.shutdown_started is not None:
        timeout_s -= time.monotonic() - lifecycle.shutdown_started
    unserved = await batcher.close(timeout_s=max(0.0, timeout_s))
    if unserved:
        log.error(
            "drain_timed_out",
            unserved_images=unserved,
            graceful_shutdown_timeout_s=settings.server.graceful_shutdown_timeout_s,
        )
        readiness.mark_failed(
            f"the drain ran out of time with {unserved} images unserved "
            f"(server.graceful_shutdown_timeout_s = "
            f"{settings.server.graceful_shutdown_timeout_s:g})",
            exit_code=ExitCode.DRAIN_TIMED_OUT,
        )


class _BatcherWhenStarted:
    """The app's batcher as the watchdog sees it: nothing runs before it exists."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def longest_running_s(self) -> float:
        batcher = self._app.get(BATCHER)
        return batcher.longest_running_s() if batcher is not None else 0.0


async def _watchdog_ctx(app: web.Application) -> AsyncIterator[None]:
    readiness = app[READINESS]
    model = app[SETTINGS].model

    def on_stall(timeout_s: float) -> Callable[[float], None]:
        def stalled(running_s: float) -> None:
            # A thread stuck in native code cannot be stopped or replaced safely (it may
            # hold the OpenMP pool or the GPU), so the process fails fast and its supervisor
            # restarts it: refuse traffic now, fail what is queued, then exit (see __main__).
            log.error("model_stalled", running_s=round(running_s, 3), stall_timeout_s=timeout_s)
            message = (
                f"the model stalled: a forward pass has run for {running_s:.0f} s; "
                "the server is restarting"
            )
            batcher = app.get(BATCHER)
            if batcher is not None:  # else the stall is a warm-up pass: nothing is queued
                batcher.abort(lambda: ModelStalledError(message))
            readiness.mark_failed(
                f"model stalled: a forward pass has run for {running_s:.0f} s "
                f"(limit {timeout_s:g} s, from model.stall_timeout_s)",
                exit_code=ExitCode.MODEL_STALLED,
            )

        return stalled

    # Compiling happens before any pass is watched: a warm-up pass is judged like a serving one.
    watchdogs = [
        StallWatchdog(
            passes, stall_timeout_s=model.stall_timeout_s, on_stall=on_stall(model.stall_timeout_s)
        )
        for passes in (_BatcherWhenStarted(app), app[_LIFECYCLE].warmup_passes)
    ]
    tasks = [asyncio.create_task(w.run(), name="stall-watchdog") for w in watchdogs]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_metrics_app(app: web.Application) -> web.Application:
    """A bare app serving ``app``'s ``/metrics``, for its own port (``metrics.port``)."""
    metrics_app = web.Application()
    metrics_app[METRICS] = app[METRICS]
    add_routes(metrics_app, probes.metrics_routes)
    return metrics_app


async def _mark_shutting_down(app: web.Application) -> None:
    # Runs before aiohttp waits for in-flight handlers: the drain's time counts from here.
    app[_LIFECYCLE].shutdown_started = time.monotonic()
    app[READINESS].mark_not_ready("shutting down")
