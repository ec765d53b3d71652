"""Prometheus metrics (aioprometheus): one registry per app, updated on the event loop only.

aioprometheus has no locks, so every update happens on the loop thread: timings measured in
worker threads are handed back and observed here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..core.batcher import BatchInfo, DropReason
from ..core.shapes import padded_size
from .shared_metrics import (
    GaugeMode,
    MetricFiles,
    SharedCounter,
    SharedGauge,
    SharedHistogram,
    render_fleet,
)

__all__ = ["ServiceMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PREPROCESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def status_class(status: int) -> str:
    """``2xx``, ``4xx``, ...: bounded cardinality for the status label."""
    return f"{status // 100}xx"


def method_label(method: str) -> str:
    """The HTTP method, or ``OTHER`` for anything a client made up."""
    return method if method in _METHODS else "OTHER"


class _Collectors:
    """Makes the registry's collectors: plain ones, or ones that also write to shared files."""

    def __init__(self, registry: Registry, files: MetricFiles | None) -> None:
        self._registry = registry
        self._files = files

    def counter(self, name: str, doc: str) -> Counter:
        if self._files is None:
            return Counter(name, doc, registry=self._registry)
        return SharedCounter(name, doc, files=self._files, registry=self._registry)

    def gauge(self, name: str, doc: str, *, mode: GaugeMode) -> Gauge:
        """``mode``: how the workers' values combine, summed (``livesum``) or one per worker."""
        if self._files is None:
            return Gauge(name, doc, registry=self._registry)
        return SharedGauge(name, doc, files=self._files, mode=mode, registry=self._registry)

    def histogram(self, name: str, doc: str, *, buckets: Sequence[float]) -> Histogram:
        if self._files is None:
            return Histogram(name, doc, registry=self._registry, buckets=buckets)
        return SharedHistogram(
            name, doc, files=self._files, registry=self._registry, buckets=buckets
        )


class ServiceMetrics:
    """Every metric the server exports, and the batcher observer that feeds the batch ones."""

    def __init__(
        self,
        *,
        model_name: str,
        max_batch_size: int,
        batch_sizes: Sequence[int] = (),
        files: MetricFiles | None = None,
    ) -> None:
        """With ``files`` (a worker among several), every change is also written there, and
        a scrape answers for the whole fleet."""
        self.registry = Registry()
        self.model_name = model_name
        self.batch_sizes = tuple(batch_sizes)
        self._files = files
        make = _Collectors(self.registry, files)
        self.request_duration = make.histogram(
            "http_request_duration_seconds",
            "Time from request received to response ready, by route template and status class.",
            buckets=LATENCY_BUCKETS,
        )
        self.requests = make.counter(
            "http_requests_total", "HTTP requests answered, by status class."
        )
        self.errors = make.counter(
            "http_errors_total", "HTTP requests answered with an error, by type."
        )
        self.in_flight = make.gauge(
            "http_requests_in_flight", "HTTP requests being handled now.", mode="livesum"
        )
        self.queue_size = make.gauge(
            "inference_queue_size",
            "Images waiting in the batcher for a forward pass.",
            mode="livesum",
        )
        self.inference_duration = make.histogram(
            "model_inference_duration_seconds",
            "Duration of one forward pass (one batch).",
            buckets=INFERENCE_BUCKETS,
        )
        self.predictions = make.counter(
            "model_predictions_total", "Images classified, by top-1 class."
        )
        self.confidence = make.histogram(
            "model_prediction_confidence",
            "Top-1 probability of each classified image.",
            buckets=CONFIDENCE_BUCKETS,
        )
        self.memory = make.gauge(
            "model_memory_usage_bytes",
            "Bytes held by the model's parameters and buffers on its device.",
            mode="liveall",
        )
        self.info = make.gauge(
            "model_info",
            "Always 1; the labels describe the model being served.",
            mode="liveall",
        )
        self.compiled = make.gauge(
            "model_compiled",
            "1 while the forward passes run compiled graphs (model.compile), 0 while eager.",
            mode="liveall",
        )
        self._compiled: Callable[[], bool] = lambda: False
        self.batch_size = make.histogram(
            "batch_size",
            "Images per forward pass.",
            buckets=tuple(float(size) for size in range(1, max_batch_size + 1)),
        )
        self.queue_wait = make.histogram(
            "batch_queue_wait_seconds",
            "Per image: time from entering the batcher's queue to dispatch.",
            buckets=WAIT_BUCKETS,
        )
        self.dispatches = make.counter(
            "batch_dispatch_total",
            "Batches dispatched, by reason: full, timeout (oldest waited), idle, drain.",
        )
        self.dropped = make.counter(
            "batch_dropped_total",
            "Images dropped before the forward pass, by reason: cancelled, expired, rejected.",
        )
        self.padding = make.counter(
            "batch_padding_images_total",
            "Zero images added to reach an allowed batch size (batching.batch_sizes).",
        )
        self.preprocess_duration = make.histogram(
            "image_preprocess_duration_seconds",
            "Time to decode and transform one image in the preprocessing pool (for a JPEG left "
            "to the model's device, to check its header).",
            buckets=PREPROCESS_BUCKETS,
        )
        self.loop_lag = make.histogram(
            "event_loop_lag_seconds",
            "How late the event loop woke a timer: time it spent blocked by other work.",
            buckets=LAG_BUCKETS,
        )
        self.loop_cpu = make.counter(
            "event_loop_cpu_seconds_total",
            "CPU time of the event loop's thread. A rate near 1 means the loop is the limit.",
        )
        # Series that should exist at zero before the first event, so rate() and absent()
        # work from the first scrape.
        for reason in ("full", "timeout", "drain", "idle"):
            self.dispatches.set({"reason": reason}, 0)
        for drop in ("cancelled", "expired", "rejected", "aborted"):
            self.dropped.set({"reason": drop}, 0)
        self.queue_size.set({}, 0)
        self.in_flight.set({}, 0)
        self.padding.set({}, 0)
        self.loop_cpu.set({}, 0)
        self.compiled.set({}, 0)

    def describe_model(
        self,
        *,
        weights: str,
        device: str,
        precision: str,
        parameter_bytes: int,
        compiled: Callable[[], bool] | None = None,
    ) -> None:
        """Set the info metric and the model's memory; ``compiled`` is read at each scrape."""
        if compiled is not None:
            self._compiled = compiled
        self.info.set(
            {
                "version": __version__,
                "model_name": self.model_name,
                # A checkpoint's file name only: its directory tells a scraper about the host.
                "weights": Path(weights).name,
                "device": device,
                "precision": precision,
            },
            1,
        )
        self.memory.set({}, parameter_bytes)

    def observe_request(
        self, *, method: str, endpoint: str, status: int, seconds: float, error_type: str | None
    ) -> None:
        """Record one answered request."""
        method = method_label(method)
        labels = {"method": method, "endpoint": endpoint, "status": status_class(status)}
        self.requests.inc(labels)
        self.request_duration.add(labels, seconds)
        if error_type is not None:
            self.errors.inc({"method": method, "endpoint": endpoint, "error_type": error_type})

    def observe_predictions(self, predictions: Sequence[tuple[str, float]]) -> None:
        """Record the top-1 class and confidence of each classified image."""
        for label, confidence in predictions:
            self.predictions.inc({"model_name": self.model_name, "prediction_class": label})
            self.confidence.add({}, confidence)

    async def watch_loop_lag(self, interval_s: float = 0.02) -> None:
        """Sample the loop's lag and its thread's CPU time forever (runs on the loop)."""
        loop = asyncio.get_running_loop()
        cpu = time.thread_time()
        while True:
            started = loop.time()
            await asyncio.sleep(interval_s)
            self.loop_lag.add({}, max(0.0, loop.time() - started - interval_s))
            # The loop's own CPU per request is the steadiest measure of its cost: wall-clock
            # lag also counts waits for a core or the GIL.
            cpu_now = time.thread_time()
            self.loop_cpu.add({}, cpu_now - cpu)
            cpu = cpu_now

    def render(self, accepts: Sequence[str]) -> tuple[bytes, dict[str, str]]:
        """The exposition body and its headers, in the format the scraper accepts."""
        # Switched by the model's side (compiling ends after readiness); read here, on the
        # loop, as aioprometheus needs.
        self.compiled.set({}, int(self._compiled()))
        if self._files is not None:
            # One of several workers: the scrape gets the whole fleet's sums, whichever
            # worker the kernel handed the connection to.
            return render_fleet(self._files.directory), {"Content-Type": CONTENT_TYPE_LATEST}
        body, headers = render(self.registry, accepts)
        return body, dict(headers)

    # BatcherObserver: called by the batcher on the loop thread.

    def on_queue_size(self, size: int) -> None:
        self.queue_size.set({}, size)

    def on_dispatch(self, info: BatchInfo) -> None:
        self.batch_size.add({}, info.size)
        self.dispatches.inc({"reason": info.reason})
        padding = padded_size(info.size, self.batch_sizes) - info.size
        if padding:
            self.padding.add({}, padding)
        for wait in info.queue_waits_s:
            self.queue_wait.add({}, wait)

    def on_batch_done(
        self, info: BatchInfo, duration_s: float, error: BaseException | None
    ) -> None:
        self.inference_duration.add({"model_name": self.model_name}, duration_s)

    def on_drop(self, reason: DropReason, count: int) -> None:
        self.dropped.add({"reason": reason}, count)
