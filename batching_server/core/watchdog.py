"""Stall detection: notice a forward pass that has run far longer than any should.

Plain asyncio like the batcher it watches. A hung forward pass cannot be interrupted (the
thread is inside native code), so the watchdog only reports it, once; ``app.py`` decides
what happens next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

__all__ = ["StallWatchdog"]


class _Watched(Protocol):
    def longest_running_s(self) -> float: ...


class StallWatchdog:
    """Calls ``on_stall(seconds)`` once, when a batch has run past ``stall_timeout_s``."""

    def __init__(
        self,
        batcher: _Watched,
        *,
        stall_timeout_s: float,
        on_stall: Callable[[float], None],
        interval_s: float | None = None,
    ) -> None:
        if stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be positive, got {stall_timeout_s}")
        self._batcher = batcher
        self.stall_timeout_s = stall_timeout_s
        self._on_stall = on_stall
        # Detection comes at most a quarter of the timeout late, and never costs a busy loop.
        self.interval_s = interval_s if interval_s is not None else min(1.0, stall_timeout_s / 4)
        self._stalled = False

    def check(self) -> bool:
        """Look once; report a stall the first time one is seen. True once one was reported."""
        if not self._stalled:
            running_s = self._batcher.longest_running_s()
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
