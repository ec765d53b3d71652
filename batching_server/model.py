"""ResNet-50: weight loading, the dedicated inference thread, warm-up and the forward pass."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from opentelemetry import trace
from opentelemetry.trace import SpanContext
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from .acceleration import (
    autocast,
    choose_precision,
    compile_module,
    compiled_graphs,
    padded_size,
    warmup_sizes,
)
from .batcher import BatchInfo
from .errors import ModelLoadError
from .settings import BatchingSettings, ModelSettings
from .threads import ThreadPlan, available_cores, configure_worker_thread, plan_threads

__all__ = ["LABELS", "Classifier", "ImageInput", "Ranked", "load_classifier", "resolve_device"]

log = structlog.get_logger(__name__)

MODEL_NAME = "resnet50"
INPUT_SIZE = 224
# The class names ship inside torchvision itself, so they are there offline too.
LABELS: tuple[str, ...] = tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])

Ranked = list[tuple[str, float]]
"""Labels with their probabilities, most likely first."""


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One preprocessed image on its way through the batcher."""

    pixels: torch.Tensor  # (3, 224, 224) float32, normalised
    request_id: str
    span_context: SpanContext | None = None  # the request's span, linked from the batch span
    top_k: int = 1  # how many ranked labels to send back


def resolve_device(requested: str) -> torch.device:
    """Map ``auto``/``cpu``/``cuda`` to a device, refusing CUDA when there is none."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "model.device is 'cuda' but no CUDA device is available to torch "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
            "Fix: run on a machine with a GPU and a CUDA build of torch, or set "
            "model.device to 'cpu' or 'auto'."
        )
    return torch.device(requested)


def _state_dict_from_file(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"could not read the state_dict file {str(path)!r}: {exc}. Fix: point "
            "model.weights at a file saved with torch.save(model.state_dict(), path)."
        ) from exc
    # Training checkpoints often wrap the weights; DataParallel prefixes every key.
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a state_dict. Fix: save "
            "torch.save(model.state_dict(), path)."
        )
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def _load_module(weights: str, seed: int) -> nn.Module:
    if weights == "random":
        # Seeded so every process (and every test run) gets the same network.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            seeded: nn.Module = resnet50(weights=None)
            return seeded
    if weights in ResNet50_Weights.__members__:
        named = ResNet50_Weights[weights]
        try:
            # torch.hub prints "Downloading: ..." to stdout, which must stay JSON lines only.
            with contextlib.redirect_stdout(sys.stderr):
                state_dict = named.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:
            raise ModelLoadError(
                f"could not obtain the ResNet-50 weights {weights} ({named.url}): {exc}. "
                "Fix: run once with network access so torchvision caches them under "
                f"{torch.hub.get_dir()}/checkpoints, or set model.weights to a local "
                "state_dict file, or (for tests only: predictions are meaningless) to 'random'."
            ) from exc
    else:
        state_dict = _state_dict_from_file(Path(weights))
    module: nn.Module = resnet50(weights=None)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the weights {weights!r} do not fit torchvision's ResNet-50: "
            f"{str(exc).splitlines()[0]}... Fix: use a state_dict of "
            "torchvision.models.resnet50."
        ) from exc
    return module


class Classifier:
    """ResNet-50 behind its own executor thread, so forward passes never block the loop."""

    name = MODEL_NAME

    def __init__(
        self,
        *,
        module: nn.Module,
        device: torch.device,
        weights: str,
        threads: ThreadPlan,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        batch_sizes: Sequence[int] = (),
        max_batch_size: int = 1,
        niceness: int = 0,
        idle: bool = False,
    ) -> None:
        self.device = device
        self.weights = weights
        self.threads = threads
        self.precision = precision
        self.channels_last = channels_last
        self.compiled = compile
        self.batch_sizes = tuple(batch_sizes)
        self.labels = LABELS
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # No parameter needs a gradient here. With none, autocast never fills its weight-cast
        # cache, which is global and mutex-guarded: while it holds cast weights, a thread that
        # leaves autocast (freeing them, which needs the GIL) and a thread that compiles
        # (holding the GIL, casting under that mutex) can deadlock each other (seen with two
        # model threads).
        self.module = (
            module.eval().requires_grad_(False).to(device).to(memory_format=self.memory_format)
        )
        self._run: Any = self.module
        # A one-image batch on every core is one more compiled graph: dynamo guards on the
        # thread count.
        self._solo = threads.solo_threads != threads.threads and padded_size(1, batch_sizes) == 1
        if compile:
            shapes = len(warmup_sizes(max_batch_size, self.batch_sizes)) + self._solo
            self._run = compile_module(self.module, shapes=shapes, cpp_wrapper=device.type == "cpu")
        self._local = threading.local()
        # Dynamo's graph count when warm-up ended (None until then, and without compile), and
        # how many compiles since then have been logged.
        self._graphs_at_warmup: int | None = None
        self._compiles_logged = 0
        self._busy = 0  # forward passes handed to a thread and not ended; a stalled one never ends
        self._busy_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            max_workers=threads.concurrent_batches,
            thread_name_prefix="model",
            initializer=functools.partial(
                configure_worker_thread,
                torch_threads=threads.threads,
                niceness=niceness,
                idle=idle,
            ),
        )
        # A lone image's pass gets a thread of its own that stays at the solo thread count.
        # Switching one thread's count for each lone image cost about 2 ms of a 10-26 ms pass:
        # each torch.set_num_threads clears that thread's cache of oneDNN conv primitives.
        self._solo_executor = (
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="model-solo",
                initializer=functools.partial(
                    configure_worker_thread,
                    torch_threads=threads.solo_threads,
                    niceness=niceness,
                    idle=idle,
                ),
            )
            if self._solo
            else None
        )

    def forward(self, pixels: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        """Class probabilities (N, 1000) on the CPU for a (N, 3, 224, 224) batch; blocking.

        The batch is zero-padded up to the next of ``batch_sizes``, so compiled graphs see
        only the shapes warm-up compiled. It runs on ``threads`` torch threads (default: the
        plan's per pass), in whichever thread calls.
        """
        # Compiled graphs guard on the thread count too: the caller's must not leak in.
        wanted = threads or self.threads.threads
        previous = torch.get_num_threads()
        if previous == wanted:
            return self._forward(pixels)
        torch.set_num_threads(wanted)
        try:
            return self._forward(pixels)
        finally:
            torch.set_num_threads(previous)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = pixels.shape[0]
        padded = padded_size(size, self.batch_sizes)
        # Inference mode throughout: compiled graphs guard on the input's dispatch keys, and
        # a batch made outside it would miss every warm-up graph and recompile (seconds).
        with torch.inference_mode():
            if padded > size:
                padding = pixels.new_zeros(padded - size, *pixels.shape[1:])
                pixels = torch.cat([pixels, padding.contiguous(memory_format=self.memory_format)])
            stream: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if self.device.type == "cuda":
                # Page-locked memory lets the copy overlap with work already on the GPU, and
                # a stream per model thread lets one batch's copy run beside another's
                # kernels: on the shared default stream, two model threads only queue behind
                # each other.
                pixels = pixels.pin_memory()
                stream = torch.cuda.stream(self._thread_stream())
            with stream, autocast(self.precision, self.device):
                batch = pixels.to(self.device, non_blocking=True)
                # A no-op for the preprocessor's images, which come channels-last already.
                batch = batch.contiguous(memory_format=self.memory_format)
                if not batch.is_inference():
                    batch = batch.clone()  # only for callers outside the server
                logits = self._run(batch)[:size]
                return torch.softmax(logits.float(), dim=1).cpu()

    def _thread_stream(self) -> torch.cuda.Stream:
        stream: torch.cuda.Stream | None = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        return stream

    def stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One batch of (3, 224, 224) images, in the model's memory layout."""
        with torch.inference_mode():
            if len(images) == 1:
                # A lone image needs no copy when it is in the model's layout already (the
                # preprocessor's are): a batch of one is a view of it. Its batch stride is the
                # image's size, as a stacked batch's is: compiled graphs guard on every
                # stride, even of a dimension of size 1 (unsqueeze's would recompile).
                image = images[0]
                single = image.as_strided(
                    (1, *image.shape), (image.numel(), *image.stride()), image.storage_offset()
                )
                if single.is_contiguous(memory_format=self.memory_format):
                    return single
            # Stacked straight into the model's layout: the preprocessor's images are
            # channels-last already, so this is the only copy.
            batch = torch.empty((len(images), *images[0].shape), memory_format=self.memory_format)
            return torch.stack(images, out=batch)

    def _forward_inputs(self, items: Sequence[ImageInput], threads: int | None) -> list[Ranked]:
        started = time.perf_counter()
        probabilities = self.forward(self.stack([item.pixels for item in items]), threads=threads)
        if (compiles := self.compiles_after_warmup) > self._compiles_logged:
            self._log_compiles(compiles, len(items), threads)
        # Runs in the model thread, inside the caller's context: this lands on the batch span.
        trace.get_current_span().add_event(
            "forward_pass",
            {
                "thread": threading.current_thread().name,
                "torch_threads": threads or self.threads.threads,
                "seconds": time.perf_counter() - started,
            },
        )
        # Ranked here, once per batch, so the event loop gets plain lists and makes no torch
        # call: each one releases the GIL, and taking it back can cost the loop a switch
        # interval (5 ms) while decode threads hold it.
        return self.rank(probabilities, [item.top_k for item in items])

    @property
    def compiles_after_warmup(self) -> int:
        """Graphs compiled since warm-up ended: each one made a batch wait seconds."""
        if self._graphs_at_warmup is None:
            return 0
        return compiled_graphs() - self._graphs_at_warmup

    def _log_compiles(self, compiles: int, size: int, threads: int | None) -> None:
        # Warm-up compiles every shape the batcher can send, so a compile now means a guard
        # that warm-up did not foresee: loud, since that batch (and, while dynamo held the
        # GIL, every other request) waited seconds. Two model threads may both log one.
        new, self._compiles_logged = compiles - self._compiles_logged, compiles
        log.warning(
            "model_compiled_after_warmup",
            graphs=new,
            batch_size=size,
            torch_threads=threads or self.threads.threads,
        )

    async def predict_batch(self, items: Sequence[ImageInput], info: BatchInfo) -> list[Ranked]:
        """Run one forward pass for a batch; each item's ``top_k`` ranked labels."""
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
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        passes: list[tuple[ThreadPoolExecutor, int, int | None]] = [
            (self._executor, size, None) for size in sizes
        ]
        if self._solo_executor is not None and 1 in sizes:
            passes.append((self._solo_executor, 1, self.threads.solo_threads))
        for executor, size, threads in passes:
            dummy = torch.zeros(size, 3, INPUT_SIZE, INPUT_SIZE)
            await loop.run_in_executor(
                executor, functools.partial(self.forward, dummy, threads=threads)
            )
        if self.compiled:
            self._graphs_at_warmup = compiled_graphs()
        return time.perf_counter() - started

    def rank(self, probabilities: torch.Tensor, ks: Sequence[int]) -> list[Ranked]:
        """Each row's ``ks[i]`` most likely labels, most likely first, from one ``topk``."""
        values, indices = torch.topk(probabilities, max(ks))
        labels = self.labels
        return [
            [(labels[i], v) for v, i in zip(row_values[:k], row_indices[:k], strict=True)]
            for row_values, row_indices, k in zip(
                values.tolist(), indices.tolist(), ks, strict=True
            )
        ]

    def close(self) -> None:
        """Stop the model threads once their batches end; a batch still running is abandoned.

        By the time the app closes the classifier the batcher has drained, so a forward pass
        still running is a stalled one: waiting for it would hang the shutdown.
        """
        with self._busy_lock:
            busy = self._busy
        if busy:
            log.warning("model_threads_abandoned", running_forward_passes=busy)
        for executor in (self._executor, self._solo_executor):
            if executor is not None:
                executor.shutdown(wait=not busy, cancel_futures=True)


def _set_interop_threads(count: int) -> None:
    if count:
        try:
            torch.set_num_interop_threads(count)
        except RuntimeError as exc:  # only possible before any inter-op work has started
            log.warning("interop_threads_not_applied", requested=count, error=str(exc))


def load_classifier(
    settings: ModelSettings,
    *,
    batching: BatchingSettings | None = None,
    niceness: int = 0,
    idle: bool = False,
) -> Classifier:
    """Load ResNet-50 as ``settings`` say; raises ``ModelLoadError`` with the fix.

    ``niceness`` and ``idle`` set the model threads' priority (see ``server.model_niceness``
    and ``server.sched_idle``).
    """
    batching = batching or BatchingSettings()
    device = resolve_device(settings.device)
    precision, why = choose_precision(settings.precision, device)
    if device.type == "cpu" and precision == "fp16":
        log.warning("slow_precision", precision=precision, reason="fp16 on CPU is emulated")
    threads = plan_threads(
        cores=available_cores(),
        device_type=device.type,
        concurrent_batches=batching.max_concurrent_batches,
        num_threads=settings.num_threads,
    )
    _set_interop_threads(settings.interop_threads)
    started = time.perf_counter()
    module = _load_module(settings.weights, settings.seed)
    classifier = Classifier(
        module=module,
        device=device,
        weights=settings.weights,
        threads=threads,
        precision=precision,
        channels_last=settings.channels_last,
        compile=settings.compile,
        batch_sizes=batching.batch_sizes,
        max_batch_size=batching.max_batch_size,
        niceness=niceness,
        idle=idle,
    )
    log.info(
        "model_loaded",
        model=MODEL_NAME,
        weights=settings.weights,
        device=str(device),
        precision=precision,
        precision_reason=why,
        channels_last=settings.channels_last,
        compile=settings.compile,
        concurrent_batches=threads.concurrent_batches,
        num_threads=threads.threads,
        solo_threads=threads.solo_threads,
        load_seconds=round(time.perf_counter() - started, 3),
        parameter_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
    )
    return classifier
