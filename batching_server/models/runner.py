"""``ModelRunner``: the model threads, and one forward pass per batch the batcher sends.

It owns the executors of the thread plan (a lone image gets a thread of its own at the solo
thread count), the count of passes in flight, warm-up, and ranking the probabilities into
labels, so the event loop gets plain lists and makes no torch call.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog
import torch
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from ..core.batcher import BatchInfo, ItemFailed
from ..core.errors import ServiceError
from ..core.shapes import padded_size
from ..preprocess.encoded import EncodedJpeg
from .device_preprocess import DevicePreprocessor
from .forward import ForwardPass
from .threads import ThreadPlan, configure_worker_thread

__all__ = ["ImageInput", "ModelRunner", "Prediction", "Ranked", "solo_pass_pays"]

log = structlog.get_logger(__name__)

Ranked = list[tuple[str, float]]
"""Labels with their probabilities, most likely first."""


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One preprocessed image on its way through the batcher."""

    # (3, H, W) float32, normalised; or a checked JPEG the model's device decodes
    pixels: torch.Tensor | EncodedJpeg
    request_id: str
    span_context: SpanContext | None = None  # the request's span, linked from the batch span
    top_k: int = 1  # how many ranked labels to send back
    probabilities: bool = False  # send back every class's probability too


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's answer: its ``top_k`` labels, and every probability when it asked."""

    ranked: Ranked  # (label, probability), most likely first
    indices: tuple[int, ...]  # the class index of each ranked label (labels may repeat)
    probabilities: bytes | None = None  # float32, little-endian, one per class


def solo_pass_pays(threads: ThreadPlan, batch_sizes: Sequence[int]) -> bool:
    """Whether a lone image gets its own thread at the solo count (one more compiled graph).

    Only when the plan gives it more threads than a shared pass, and when a batch of one is
    not padded anyway.
    """
    return threads.solo_threads != threads.threads and padded_size(1, batch_sizes) == 1


class ModelRunner:
    """A ``ForwardPass`` behind its own threads, so forward passes never block the loop."""

    def __init__(
        self,
        *,
        name: str,
        labels: Sequence[str],
        weights: str = "",
        forward_pass: ForwardPass,
        threads: ThreadPlan,
        input_size: int = 224,
        niceness: int = 0,
        device_preprocessor: DevicePreprocessor | None = None,
    ) -> None:
        self.name = name
        # Decodes the batch's still-encoded JPEGs (preprocess.device = model); None: every
        # image arrives as a tensor.
        self.device_preprocessor = device_preprocessor
        self._device_warmed = False
        self.weights = weights  # as model.weights named them
        self.labels = tuple(labels)
        self.forward_pass = forward_pass
        self.threads = threads
        self.input_size = input_size
        self._busy = 0  # forward passes handed to a thread and not ended; a stalled one never ends
        self._busy_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            max_workers=threads.concurrent_batches,
            thread_name_prefix="model",
            initializer=functools.partial(
                configure_worker_thread, torch_threads=threads.threads, niceness=niceness
            ),
        )
        # A lone image's pass gets a thread of its own that stays at the solo thread count:
        # each torch.set_num_threads clears that thread's cache of oneDNN conv primitives,
        # so switching one thread's count per lone image would cost every such pass.
        self._solo_executor = (
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="model-solo",
                initializer=functools.partial(
                    configure_worker_thread, torch_threads=threads.solo_threads, niceness=niceness
                ),
            )
            if solo_pass_pays(threads, forward_pass.batch_sizes)
            else None
        )

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return self.forward_pass.device

    @property
    def precision(self) -> str:
        """The autocast precision the network runs in."""
        return self.forward_pass.precision

    def forward(self, pixels: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        """Probabilities for a (N, 3, H, W) batch, in the calling thread; blocking.

        ``threads`` defaults to the plan's per-pass count.
        """
        return self.forward_pass.forward(pixels, threads=threads or self.threads.threads)

    def _forward_inputs(
        self, items: Sequence[ImageInput], threads: int | None
    ) -> list[Prediction | ItemFailed]:
        started = time.perf_counter()
        # Decoded, stacked and run on this thread's stream, in that order: on CUDA, work on
        # another stream could still be writing the decoded images when the pass reads them.
        with self.forward_pass.on_stream():
            pixels = self._pixels(items)
            live = [i for i, p in enumerate(pixels) if isinstance(p, torch.Tensor)]
            refusals: list[Prediction | ItemFailed] = [
                ItemFailed(p) for p in pixels if isinstance(p, ServiceError)
            ]
            if not live:  # every image of the batch was refused: no pass to run
                return refusals
            batch = self.forward_pass.stack([p for p in pixels if isinstance(p, torch.Tensor)])
            probabilities = self.forward(batch, threads=threads)
        # Runs in the model thread, inside the caller's context: this lands on the batch span.
        trace.get_current_span().add_event(
            "forward_pass",
            {
                "thread": threading.current_thread().name,
                "torch_threads": threads or self.threads.threads,
                "seconds": time.perf_counter() - started,
            },
        )
        # Ranked here, once per batch, so the event loop gets plain lists and bytes and makes
        # no torch call: each one releases the GIL, and taking it back can cost the loop a
        # switch interval while decode threads hold it.
        predictions = self.predictions(
            probabilities,
            [items[i].top_k for i in live],
            [items[i].probabilities for i in live],
        )
        if len(live) == len(items):
            return list(predictions)
        # Refused images keep their places: the batcher answers each item by position.
        merged: list[Prediction | ItemFailed] = []
        answers, refused = iter(predictions), iter(refusals)
        for p in pixels:
            merged.append(next(answers) if isinstance(p, torch.Tensor) else next(refused))
        return merged

    def _pixels(self, items: Sequence[ImageInput]) -> list[torch.Tensor | ServiceError]:
        """Each item's tensor; still-encoded JPEGs are decoded on the device, all at once."""
        encoded = [item.pixels for item in items if isinstance(item.pixels, EncodedJpeg)]
        if not encoded:
            return [item.pixels for item in items if isinstance(item.pixels, torch.Tensor)]
        if self.device_preprocessor is None:
            raise RuntimeError(
                "an encoded JPEG reached a runner without a device preprocessor: the decode "
                "pool and the model disagree on preprocess.device"
            )
        started = time.perf_counter()
        decoded = iter(self.device_preprocessor(encoded))
        trace.get_current_span().add_event(
            "device_preprocess",
            {"images": len(encoded), "seconds": time.perf_counter() - started},
        )
        return [
            next(decoded) if isinstance(item.pixels, EncodedJpeg) else item.pixels for item in items
        ]

    async def predict_batch(
        self, items: Sequence[ImageInput], info: BatchInfo
    ) -> list[Prediction | ItemFailed]:
        """Run one forward pass for a batch; each item's prediction, or its own failure (an
        image the device could not decode, nor the CPU after it)."""
        # Executors do not carry contextvars over; the active span must reach the model
        # thread, so run the call inside a copy of this context.
        context = contextvars.copy_context()
        executor, threads = self._executor, None
        with self._busy_lock:
            # Counted here, on the loop, so that two batches dispatched back to back cannot
            # both find the model idle before either thread has started.
            if self._solo_executor is not None and not self._busy and len(items) == 1:
                executor, threads = self._solo_executor, self.threads.solo_threads
            self._busy += 1
        try:
            future = executor.submit(context.run, self._forward_inputs, items, threads)
        except BaseException:
            self._pass_ended()
            raise
        # Also when the pass never starts (cancelled while queued, or at close).
        future.add_done_callback(self._pass_ended)
        return await asyncio.wrap_future(future)

    def _pass_ended(self, _future: object = None) -> None:
        with self._busy_lock:
            self._busy -= 1

    async def warmup(self, batch_sizes: Iterable[int]) -> float:
        """Run one forward pass per batch size; returns the seconds it took."""
        sizes = sorted(set(batch_sizes))
        started = time.perf_counter()
        passes: list[tuple[ThreadPoolExecutor, int, int | None]] = [
            (self._executor, size, None) for size in sizes
        ]
        if self._solo_executor is not None and 1 in sizes:
            passes.append((self._solo_executor, 1, self.threads.solo_threads))
        for executor, size, threads in passes:
            # Counted as busy like a batch's pass: a warm-up pass that hangs must be
            # abandoned by close(), not waited for.
            with self._busy_lock:
                self._busy += 1
            try:
                future = executor.submit(self._warm_up_pass, size, threads)
            except BaseException:
                self._pass_ended()
                raise
            future.add_done_callback(self._pass_ended)
            await asyncio.wrap_future(future)
        if self.device_preprocessor is not None and not self._device_warmed:
            # Once, whichever batch sizes each call warms: the decoder's set-up is per process.
            await asyncio.wrap_future(self._executor.submit(self._warm_up_device_preprocessor))
            self._device_warmed = True
        return time.perf_counter() - started

    def _warm_up_pass(self, size: int, threads: int | None) -> None:
        # The zeros are made here, in the model thread: filling them is a parallel region,
        # and the event loop's thread must never start an OpenMP team of its own
        # (run_in_passing_thread says why).
        self.forward(torch.zeros(size, 3, self.input_size, self.input_size), threads=threads)

    def _warm_up_device_preprocessor(self) -> None:
        if self.device_preprocessor is not None:
            with self.forward_pass.on_stream():
                self.device_preprocessor.warm_up()

    def predictions(
        self,
        probabilities: torch.Tensor,
        ks: Sequence[int],
        with_rows: Sequence[bool] | None = None,
    ) -> list[Prediction]:
        """Each row's ``ks[i]`` most likely labels, most likely first, from one ``topk``; and
        the whole row of probabilities where ``with_rows[i]``."""
        values, indices = torch.topk(probabilities, max(ks))
        rows: list[bytes | None] = [None] * len(ks)
        wanted = [i for i, want in enumerate(with_rows or ()) if want]
        if wanted:
            # float32 little-endian: the Open Inference Protocol's binary FP32 layout.
            chosen = probabilities[wanted].to(torch.float32).numpy()
            for row, i in zip(chosen, wanted, strict=True):
                rows[i] = row.astype("<f4", copy=False).tobytes()
        labels = self.labels
        predictions = []
        for top_values, top_indices, k, row in zip(
            values.tolist(), indices.tolist(), ks, rows, strict=True
        ):
            ranked = [(labels[i], v) for v, i in zip(top_values[:k], top_indices[:k], strict=True)]
            predictions.append(Prediction(ranked, tuple(top_indices[:k]), row))
        return predictions

    def rank(self, probabilities: torch.Tensor, ks: Sequence[int]) -> list[Ranked]:
        """Each row's ``ks[i]`` most likely labels, most likely first."""
        return [prediction.ranked for prediction in self.predictions(probabilities, ks)]

    def close(self) -> None:
        """Stop the model threads once their batches end; a batch still running is abandoned.

        By the time the app closes the runner the batcher has drained, so a forward pass
        still running is a stalled one: waiting for it would hang the shutdown.
        """
        with self._busy_lock:
            busy = self._busy
        if busy:
            log.warning("model_threads_abandoned", running_forward_passes=busy)
        for executor in (self._executor, self._solo_executor):
            if executor is not None:
                executor.shutdown(wait=not busy, cancel_futures=True)
