"""The dynamic batcher: a bounded queue, the batch-forming rule, dispatch and result routing.

It is plain asyncio and knows nothing of HTTP; ``app.py`` wires it into aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import structlog

from .errors import (
    BatcherClosedError,
    DeadlineExceededError,
    InferenceError,
    QueueFullError,
    ServiceError,
)

__all__ = [
    "BatchFunction",
    "BatchInfo",
    "BatchPlan",
    "Batcher",
    "BatcherObserver",
    "DispatchReason",
    "DropReason",
    "ItemFailed",
    "plan_batch",
]

T = TypeVar("T")
R = TypeVar("R")

DispatchReason = Literal["full", "timeout", "drain", "idle"]
DropReason = Literal["cancelled", "expired", "rejected", "aborted"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What to do next: take ``size`` items now for ``reason``, or wait until ``wake_at``."""

    size: int = 0
    reason: DispatchReason | None = None
    wake_at: float | None = None


def plan_batch(
    *,
    queued: int,
    oldest_enqueued_at: float | None,
    now: float,
    max_batch_size: int,
    max_wait_s: float,
    draining: bool = False,
    incoming: int | None = None,
) -> BatchPlan:
    """Decide whether the next batch goes now, and how big it is.

    A batch goes as soon as it is full, or once its oldest item has waited ``max_wait_s``;
    while draining, whatever is queued goes at once, and so it does when ``incoming`` (items
    known to be on their way) is 0, as waiting could not fill the batch. ``wake_at is None``
    means wait for an arrival.
    """
    if queued == 0 or oldest_enqueued_at is None:
        return BatchPlan()
    if queued >= max_batch_size:
        return BatchPlan(size=max_batch_size, reason="full")
    if draining:
        return BatchPlan(size=queued, reason="drain")
    if incoming == 0:
        return BatchPlan(size=queued, reason="idle")
    deadline = oldest_enqueued_at + max_wait_s
    if now >= deadline:
        return BatchPlan(size=queued, reason="timeout")
    return BatchPlan(wake_at=deadline)


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Facts about one dispatched batch, for the model, metrics, traces and logs."""

    size: int
    reason: DispatchReason
    dispatched_at: float
    queue_waits_s: tuple[float, ...]


class BatcherObserver(Protocol):
    """Receives the batcher's events, always on the event loop thread."""

    def on_queue_size(self, size: int) -> None: ...
    def on_dispatch(self, info: BatchInfo) -> None: ...
    def on_batch_done(
        self, info: BatchInfo, duration_s: float, error: BaseException | None
    ) -> None: ...
    def on_drop(self, reason: DropReason, count: int) -> None: ...


class _GuardedObserver:
    """Forwards each event to an observer, logging (never raising) what the observer raises.

    Observers feed metrics: a bug in one must cost the metrics, never a caller's result,
    and never the dispatcher (whose death would strand every queued future).
    """

    def __init__(self, observer: BatcherObserver) -> None:
        self._observer = observer

    def on_queue_size(self, size: int) -> None:
        _guarded("on_queue_size", lambda: self._observer.on_queue_size(size))

    def on_dispatch(self, info: BatchInfo) -> None:
        _guarded("on_dispatch", lambda: self._observer.on_dispatch(info))

    def on_batch_done(
        self, info: BatchInfo, duration_s: float, error: BaseException | None
    ) -> None:
        _guarded("on_batch_done", lambda: self._observer.on_batch_done(info, duration_s, error))

    def on_drop(self, reason: DropReason, count: int) -> None:
        _guarded("on_drop", lambda: self._observer.on_drop(reason, count))


def _guarded(event: str, call: Callable[[], None]) -> None:
    try:
        call()
    except Exception:
        log.exception("batcher_observer_failed", observer_event=event)


class _NullObserver:
    def on_queue_size(self, size: int) -> None:
        pass

    def on_dispatch(self, info: BatchInfo) -> None:
        pass

    def on_batch_done(
        self, info: BatchInfo, duration_s: float, error: BaseException | None
    ) -> None:
        pass

    def on_drop(self, reason: DropReason, count: int) -> None:
        pass


@dataclass(eq=False, slots=True)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued_at: float
    deadline: float | None
    queued: bool = field(default=True)


def _resolve(future: asyncio.Future[R], result: R) -> None:
    # A caller that timed out or went away has a cancelled future: completing it would raise
    # InvalidStateError, so every completion checks first.
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


@dataclass(frozen=True, slots=True)
class ItemFailed:
    """A batch function's result for one item that failed alone: its caller gets ``error``.

    The rest of the batch is unaffected (a corrupt image found only when the model's device
    decodes it, say); an exception raised by the batch function still fails every item.
    """

    error: ServiceError


BatchFunction = Callable[[Sequence[T], BatchInfo], Awaitable[Sequence[R | ItemFailed]]]


class Batcher(Generic[T, R]):
    """Groups submitted items into batches and runs ``batch_fn`` once per batch.

    ``batch_fn`` gets the items in submission order and must return one result per item,
    or an ``ItemFailed`` for an item that failed on its own.
    """

    def __init__(
        self,
        batch_fn: BatchFunction[T, R],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        max_concurrent_batches: int = 1,
        clock: Callable[[], float] = time.monotonic,
        observer: BatcherObserver | None = None,
        dispatch_when_idle: bool = False,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be at least 1, got {max_queue_size}")
        if max_concurrent_batches < 1:
            raise ValueError(
                f"max_concurrent_batches must be at least 1, got {max_concurrent_batches}"
            )
        self._batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self._clock = clock
        self._observer: BatcherObserver = _GuardedObserver(observer or _NullObserver())
        # Called if the dispatcher dies of an unexpected error: nothing would be served again.
        self._on_failure = on_failure
        # Withdrawn entries stay in the deque, marked not queued, until they reach its head
        # or outnumber the queued ones: removing each from the middle would cost O(n), and a
        # mass disconnect at a full queue O(n^2). The counts keep queue_size exact.
        self._queue: deque[_Pending[T, R]] = deque()
        self._queued = 0  # entries of _queue still queued
        self._withdrawn = 0  # entries of _queue withdrawn, not yet dropped from it
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        # Running batches, each with its facts: its dispatch time (batcher clock) for stall
        # detection, its size for Retry-After and for what a timed-out drain abandons.
        self._running: dict[asyncio.Task[None], BatchInfo] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self._abort_error: Callable[[], ServiceError] | None = None
        # Callers inside expecting(): their items are on the way (uploading, decoding).
        self._dispatch_when_idle = dispatch_when_idle
        self._expected = 0
        # Measured seconds of forward pass per image (moving average), for Retry-After.
        self._seconds_per_item = 0.0

    @property
    def queue_size(self) -> int:
        """Items waiting for a batch (not counting those in a running batch)."""
        return self._queued

    @property
    def running_batches(self) -> int:
        """Batches whose forward pass is in flight."""
        return len(self._running)

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Mark a caller that will submit soon (while it uploads and decodes, say).

        With ``dispatch_when_idle``, a partial batch waits ``max_wait_s`` only while some
        caller is expecting: when none is, no item can join it, and it goes at once.
        """
        self._expected += 1
        try:
            yield
        finally:
            self._expected -= 1
            if not self._expected:
                self._wakeup.set()  # a partial batch may go now

    def longest_running_s(self) -> float:
        """Seconds the oldest batch still in flight has been running (0 when none is)."""
        if not self._running:
            return 0.0
        return self._clock() - min(info.dispatched_at for info in self._running.values())

    def estimated_wait_s(self) -> float:
        """Seconds until the images queued now are served, at the measured service rate."""
        running = sum(info.size for info in self._running.values())
        # The rate is measured per batch, and up to max_concurrent_batches batches run side
        # by side: the images ahead are served that many times faster than one batch alone.
        return (self._queued + running) * self._seconds_per_item / self.max_concurrent_batches

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called: submissions are refused."""
        return self._closed

    def start(self) -> None:
        """Start dispatching; call once, inside the running loop."""
        if self._dispatcher is not None:
            raise RuntimeError("Batcher.start() was called twice")
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="batcher-dispatch")

    async def submit(self, item: T, *, timeout_s: float | None = None) -> R:
        """Queue one item and return its result, or raise its error."""
        (result,) = await self.submit_many((item,), timeout_s=timeout_s)
        return result

    async def submit_many(self, items: Iterable[T], *, timeout_s: float | None = None) -> list[R]:
        """Queue several items at once, all or none, and return their results in order.

        Raises ``QueueFullError`` when they do not all fit, ``DeadlineExceededError`` when
        ``timeout_s`` seconds pass first, and ``InferenceError`` when their batch fails.
        """
        items = list(items)
        if self._closed or self._dispatcher is None:
            raise BatcherClosedError("the server is shutting down and accepts no new images")
        if self._dispatcher.done():
            raise InferenceError("the batcher stopped unexpectedly")
        if self._queued + len(items) > self.max_queue_size:
            self._observer.on_drop("rejected", len(items))
            retry_after = self.estimated_wait_s()
            raise QueueFullError(
                f"the inference queue is full ({self._queued} of {self.max_queue_size} "
                f"images waiting); retry in about {max(1, math.ceil(retry_after))} s",
                retry_after_s=retry_after,
            )
        loop = asyncio.get_running_loop()
        now = self._clock()
        deadline = None if timeout_s is None else now + timeout_s
        pending = [_Pending[T, R](item, loop.create_future(), now, deadline) for item in items]
        self._queue.extend(pending)
        self._queued += len(pending)
        self._observer.on_queue_size(self._queued)
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s):
                if len(pending) == 1:
                    # Awaited directly: gather wakes its caller a loop round after the
                    # result (its own callback runs first), and under load a round is
                    # every other ready callback.
                    return [await pending[0].future]
                return list(await asyncio.gather(*(p.future for p in pending)))
        except TimeoutError:
            self._withdraw(pending, "expired")
            raise DeadlineExceededError(
                f"no result within the request deadline of {timeout_s:.3f} s"
            ) from None
        except BaseException:
            # Cancelled (client gone) or a failed batch: the rest of this request's items
            # must not cost compute, so they leave the queue now.
            self._withdraw(pending, "cancelled")
            raise

    def _withdraw(self, pending: list[_Pending[T, R]], reason: DropReason) -> None:
        # O(1) per item: marked here, dropped from the deque when _take or _compact meets it.
        queued = [p for p in pending if p.queued]
        for p in pending:
            p.future.cancel()
        if not queued:
            return
        for p in queued:
            p.queued = False
        self._queued -= len(queued)
        self._withdrawn += len(queued)
        if self._withdrawn > self._queued:
            self._compact()
        self._observer.on_drop(reason, len(queued))
        self._observer.on_queue_size(self._queued)

    def _compact(self) -> None:
        # Runs only once withdrawn entries outnumber queued ones, so its O(n) costs O(1)
        # per withdrawal, and withdrawn entries never hold more memory than queued ones.
        self._queue = deque(p for p in self._queue if p.queued)
        self._withdrawn = 0

    def _oldest_queued(self) -> _Pending[T, R] | None:
        while self._queue and not self._queue[0].queued:
            self._queue.popleft()
            self._withdrawn -= 1
        return self._queue[0] if self._queue else None

    def _clear_queue(self) -> list[_Pending[T, R]]:
        """Empty the queue; return the entries that were still queued."""
        queued = [p for p in self._queue if p.queued]
        for p in queued:
            p.queued = False
        self._queue.clear()
        self._queued = self._withdrawn = 0
        return queued

    async def close(self, *, timeout_s: float | None = None) -> int:
        """Refuse new items, dispatch everything queued, and wait for running batches.

        With ``timeout_s``, whatever is still queued or running after that many seconds
        fails with ``BatcherClosedError`` (as in ``abort()``). Returns how many images were
        failed so (0: everything queued was served).
        """
        self._closed = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s):
                await self._stopped()
        except TimeoutError:
            unserved = self._queued + sum(info.size for info in self._running.values())
            self.abort(
                lambda: BatcherClosedError(
                    "the server shut down before this image was served: its drain ran out of time"
                )
            )
            await self._stopped()  # prompt: abort() cancelled everything
            return unserved
        return 0

    async def _stopped(self) -> None:
        # wait(), not await: the dispatcher may have died or been cancelled (already logged),
        # and a timeout around this must not cancel what it waits for.
        if self._dispatcher is not None:
            await asyncio.wait({self._dispatcher})
        while self._running:
            await asyncio.wait(set(self._running))

    def abort(self, error: Callable[[], ServiceError]) -> None:
        """Stop for good: fail every queued and running item with a new ``error()`` at once.

        For a model that hangs: a running batch is abandoned, not waited for (its thread
        cannot be interrupted), so ``close()`` returns promptly afterwards.
        """
        self._closed = True
        self._abort_error = error
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        queued = self._clear_queue()
        for p in queued:
            _fail(p.future, error())  # one exception object per caller, as in _run()
        if queued:
            self._observer.on_drop("aborted", len(queued))
            self._observer.on_queue_size(0)
        for task in self._running:
            task.cancel()

    async def _dispatch_loop(self) -> None:
        try:
            while True:
                # Take a slot before forming a batch: items that arrive while the model is
                # busy then join the next batch instead of waiting behind a half-empty one.
                await self._slots.acquire()
                batch = await self._next_batch()
                if batch is None:
                    self._slots.release()
                    return
                info, live = batch
                task = asyncio.create_task(self._run(info, live), name="batcher-run")
                self._running[task] = info
                task.add_done_callback(self._batch_finished)
        except BaseException as exc:
            # Nothing may wait forever on a future whose dispatcher is gone.
            for p in self._clear_queue():
                _fail(p.future, self._closing_error("the batcher stopped unexpectedly"))
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("batcher_crashed")
                self._closed = True  # nothing queued now would ever be dispatched
                if self._on_failure is not None:
                    self._on_failure(exc)
            raise

    def _closing_error(self, message: str) -> ServiceError:
        return self._abort_error() if self._abort_error else BatcherClosedError(message)

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slots.release()

    async def _next_batch(self) -> tuple[BatchInfo, list[_Pending[T, R]]] | None:
        while True:
            now = self._clock()
            oldest = self._oldest_queued()
            plan = plan_batch(
                queued=self._queued,
                oldest_enqueued_at=oldest.enqueued_at if oldest else None,
                now=now,
                max_batch_size=self.max_batch_size,
                max_wait_s=self.max_wait_s,
                draining=self._closed,
                incoming=self._expected if self._dispatch_when_idle else None,
            )
            if plan.reason is not None:
                batch = self._take(plan.size, plan.reason, now)
                if batch is not None:
                    return batch
                continue
            if self._closed:
                return None
            self._wakeup.clear()
            timeout = None if plan.wake_at is None else max(0.0, plan.wake_at - now)
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _take(
        self, size: int, reason: DispatchReason, now: float
    ) -> tuple[BatchInfo, list[_Pending[T, R]]] | None:
        live: list[_Pending[T, R]] = []
        cancelled = expired = taken = 0
        while taken < size:  # size is at most self._queued: the loop ends
            p = self._queue.popleft()
            if not p.queued:  # withdrawn: its caller was told already
                self._withdrawn -= 1
                continue
            p.queued = False
            self._queued -= 1
            taken += 1
            if p.future.done():
                cancelled += 1
            elif p.deadline is not None and now >= p.deadline:
                # Its caller is about to time out: spend no compute on it.
                _fail(p.future, DeadlineExceededError("the request deadline passed in the queue"))
                expired += 1
            else:
                live.append(p)
        self._observer.on_queue_size(self._queued)
        if cancelled:
            self._observer.on_drop("cancelled", cancelled)
        if expired:
            self._observer.on_drop("expired", expired)
        if not live:
            return None
        info = BatchInfo(
            size=len(live),
            reason=reason,
            dispatched_at=now,
            queue_waits_s=tuple(now - p.enqueued_at for p in live),
        )
        return info, live

    async def _run(self, info: BatchInfo, live: list[_Pending[T, R]]) -> None:
        started = self._clock()
        error: BaseException | None = None
        try:
            # Inside the try: whatever raises here still fails the batch's futures.
            self._observer.on_dispatch(info)
            results = await self._batch_fn([p.item for p in live], info)
            if len(results) != len(live):
                raise InferenceError(
                    f"the model returned {len(results)} results for a batch of {len(live)}"
                )
        except asyncio.CancelledError as exc:
            error = exc
            for p in live:
                _fail(p.future, self._closing_error("the batch was cancelled"))
            raise
        except Exception as exc:
            error = exc
            log.error("batch_failed", size=info.size, reason=info.reason, exc_info=exc)
            message = (
                exc.message
                if isinstance(exc, InferenceError)
                else "inference failed for this request's batch"
            )
            for p in live:
                # One exception object per caller: each raise mutates its traceback.
                public = InferenceError(message)
                public.__cause__ = exc
                _fail(p.future, public)
        else:
            per_item = (self._clock() - started) / len(live)
            previous = self._seconds_per_item
            self._seconds_per_item = per_item if previous == 0 else 0.8 * previous + 0.2 * per_item
            for p, result in zip(live, results, strict=True):
                if isinstance(result, ItemFailed):
                    _fail(p.future, result.error)
                else:
                    _resolve(p.future, result)
        finally:
            self._observer.on_batch_done(info, self._clock() - started, error)
