"""Fakes and spies: batch functions for batcher tests, a classifier spy, a torch-call counter."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from torch.overrides import TorchFunctionMode

from batching_server.core.batcher import BatchInfo

__all__ = [
    "CountingDeque",
    "FailingModel",
    "FakeClock",
    "GatedModel",
    "MiscountingModel",
    "RaisingObserver",
    "RecordingModel",
    "RecordingObserver",
    "SpyRunner",
    "TorchCalls",
]


class RecordingModel:
    """Answers each item with ``item * 10`` and records every batch it ran."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.infos: list[BatchInfo] = []

    async def __call__(self, items: Sequence[int], info: BatchInfo) -> list[int]:
        self.batches.append(list(items))
        self.infos.append(info)
        return [item * 10 for item in items]


class GatedModel(RecordingModel):
    """Like RecordingModel, but every batch waits until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, items: Sequence[int], info: BatchInfo) -> list[int]:
        self.batches.append(list(items))
        self.infos.append(info)
        self.started.set()
        await self.gate.wait()
        return [item * 10 for item in items]


class FailingModel(RecordingModel):
    """Raises for any batch that contains ``poison``; answers the others."""

    def __init__(self, poison: int) -> None:
        super().__init__()
        self.poison = poison

    async def __call__(self, items: Sequence[int], info: BatchInfo) -> list[int]:
        result = await super().__call__(items, info)
        if self.poison in items:
            raise RuntimeError("simulated CUDA error: device-side assert at /secret/path.cu")
        return result


class MiscountingModel(RecordingModel):
    """Returns one result too few."""

    async def __call__(self, items: Sequence[int], info: BatchInfo) -> list[int]:
        result = await super().__call__(items, info)
        return result[:-1]


class RecordingObserver:
    """Collects the batcher's events for assertions."""

    def __init__(self) -> None:
        self.queue_sizes: list[int] = []
        self.dispatched: list[BatchInfo] = []
        self.done: list[tuple[BatchInfo, BaseException | None]] = []
        self.drops: dict[str, int] = {}

    def on_queue_size(self, size: int) -> None:
        self.queue_sizes.append(size)

    def on_dispatch(self, info: BatchInfo) -> None:
        self.dispatched.append(info)

    def on_batch_done(
        self, info: BatchInfo, duration_s: float, error: BaseException | None
    ) -> None:
        self.done.append((info, error))

    def on_drop(self, reason: str, count: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count


class RaisingObserver(RecordingObserver):
    """Records like RecordingObserver, then raises from the events named in ``raising``."""

    def __init__(self, *raising: str) -> None:
        super().__init__()
        self.raising = set(raising)

    def _maybe_raise(self, event: str) -> None:
        if event in self.raising:
            raise RuntimeError(f"observer bug in {event}")

    def on_queue_size(self, size: int) -> None:
        super().on_queue_size(size)
        self._maybe_raise("on_queue_size")

    def on_dispatch(self, info: BatchInfo) -> None:
        super().on_dispatch(info)
        self._maybe_raise("on_dispatch")

    def on_batch_done(
        self, info: BatchInfo, duration_s: float, error: BaseException | None
    ) -> None:
        super().on_batch_done(info, duration_s, error)
        self._maybe_raise("on_batch_done")

    def on_drop(self, reason: str, count: int) -> None:
        super().on_drop(reason, count)
        self._maybe_raise("on_drop")


class FakeClock:
    """A clock that moves only when the test says so, and raises ``error`` once it is set."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.error: BaseException | None = None

    def __call__(self) -> float:
        if self.error is not None:
            raise self.error
        return self.now


class CountingDeque(deque[Any]):
    """A deque that counts the entries every iteration over it visits (work, not time)."""

    def __init__(self) -> None:
        super().__init__()
        self.visited = 0

    def __iter__(self) -> Iterator[Any]:
        for entry in super().__iter__():
            self.visited += 1
            yield entry

    def remove(self, value: Any) -> None:
        self.visited += self.index(value) + 1  # a search from the left, in C
        super().remove(value)


class SpyRunner:
    """Wraps the real model runner: records batch sizes, can hold or fail forward passes."""

    def __init__(self, real: Any, *, fail_first: int = 0) -> None:
        self.real = real
        self.labels = real.labels
        self.device = real.device
        self.threads = real.threads
        self.name = real.name
        self.precision = real.precision
        self.forward_pass = real.forward_pass
        self.device_preprocessor = real.device_preprocessor
        self.batch_sizes: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.fail_first = fail_first
        self.warmup_gate = asyncio.Event()
        self.warmup_gate.set()
        self.warmup_started = asyncio.Event()
        self.warmed_sizes: list[int] = []

    async def predict_batch(self, items: Sequence[Any], info: BatchInfo) -> list[Any]:
        self.batch_sizes.append(len(items))
        self.started.set()
        await self.gate.wait()
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RuntimeError("simulated failure in /opt/secret/model.py line 42")
        return await self.real.predict_batch(items, info)  # type: ignore[no-any-return]

    async def warmup(self, batch_sizes: Any) -> float:
        self.warmed_sizes.extend(batch_sizes)
        self.warmup_started.set()
        await self.warmup_gate.wait()
        return await self.real.warmup(batch_sizes)  # type: ignore[no-any-return]


class TorchCalls(TorchFunctionMode):
    """Records the name of every torch call made in this thread while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))
