"""``DecodePool``: the decode threads, where uploads become tensors off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..core.errors import DeadlineExceededError, ServiceError
from .encoded import EncodedJpeg
from .preprocessor import Preprocessor

__all__ = ["DecodePool", "Decoded"]

Decoded = tuple[torch.Tensor | EncodedJpeg | ServiceError, float]
"""The tensor (or the checked, still encoded JPEG, or the client's error) and the seconds the
decode took."""


class DecodePool:
    """Runs ``preprocessor`` in ``threads`` worker threads; each is set up by ``initializer``."""

    def __init__(
        self,
        *,
        preprocessor: Preprocessor,
        threads: int,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        self.preprocessor = preprocessor
        # Decoding is CPU-bound and releases the GIL: one thread per core keeps every core busy.
        self.executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="preprocess", initializer=initializer
        )

    async def decode(self, data: bytes, *, deadline: float | None = None) -> Decoded:
        """Preprocess ``data`` in a decode thread; a rejected image's error is returned.

        Past ``deadline`` (``time.monotonic()``) when a thread takes it up, ``data`` is not
        decoded: a ``DeadlineExceededError`` is returned.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._timed, data, deadline)

    def _timed(self, data: bytes, deadline: float | None = None) -> Decoded:
        # Checked here, in the thread: an image that waited in the queue past its request's
        # deadline is decoded for nobody, even when the loop is too busy to cancel it.
        if deadline is not None and time.monotonic() >= deadline:
            return DeadlineExceededError("the request deadline passed before decoding"), 0.0
        # Rejected images are timed too: junk costs decode time as well.
        started = time.perf_counter()
        try:
            result: torch.Tensor | EncodedJpeg | ServiceError = self.preprocessor.prepare(
                data, deadline=deadline
            )
        except ServiceError as exc:
            result = exc
        return result, time.perf_counter() - started

    def close(self) -> None:
        """Finish running decodes, drop queued ones, and stop the threads."""
        self.executor.shutdown(wait=True, cancel_futures=True)
