"""Stall detection: notice a forward pass that has run far longer than any should.

Plain asyncio like the batcher it watches (and warm-up passes, through ``PassTimer``). A hung
forward pass cannot be interrupted (the thread is inside native code), so the watchdog only
reports it, once; ``app.py`` decides what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Protocol

__all__ = ["PassTimer", "StallWatchdog", "Watched"]


class Watched(Protocol):
    """Anything that runs forward passes and can say how long its oldest one has run."""

    def longest_running_s(self) -> float: ...


class PassTimer:
    """Times forward passes run outside the batcher (warm-up), so a watchdog sees them too."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started: dict[int, float] = {}
        self._ids = itertools.count()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Count the pass inside the block as running, from now until the block ends."""
        key = next(self._ids)
        self._started[key] = self._clock()
        try:
            yield
        finally:
            del self._started[key]

    def longest_running_s(self) -> float:
        """Seconds the oldest pass still in its block has run (0 when none is)."""
        if not self._started:
            return 0.0
        return self._clock() - min(self._started.values())


class StallWatchdog:
    """Calls ``on_stall(seconds)`` once, when a pass of any ``watched`` has run too long."""

    def __init__(
        self,
        *watched: Watched,
        stall_timeout_s: float,
        on_stall: Callable[[float], None],
        interval_s: float | None = None,
    ) -> None:
        if stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be positive, got {stall_timeout_s}")
        if not watched:
            raise ValueError("StallWatchdog needs something to watch")
        self._watched = watched
        self.stall_timeout_s = stall_timeout_s
        self._on_stall = on_stall
        # Detection comes at most a quarter of the timeout late, and never costs a busy loop.
        self.interval_s = interval_s if interval_s is not None else min(1.0, stall_timeout_s / 4)
        self._stalled = False

    def check(self) -> bool:
        """Look once; report a stall the first time one is seen. True once one was reported."""
        if not self._stalled:
            running_s = max(w.longest_running_s() for w in self._watched)
            if running_s > self.stall_timeout_s:
                self._stalled = True
                self._on_stall(running_s)
        return self._stalled

    async def run(self) -> None:
        """Check every ``interval_s`` until a stall is reported (or until cancelled)."""
        # Polling on purpose: a hung thread sends no signal, so only the clock can tell.
        while True:
            if self.check():
                return
            await asyncio.sleep(self.interval_s)
