"""Readiness: whether the server should take traffic now, and if not, why."""

from __future__ import annotations

import asyncio

__all__ = ["Readiness"]


class Readiness:
    """Tracks the lifecycle: starting, warming up, ready, shutting down, or failed."""

    def __init__(self) -> None:
        self._reason = "starting"
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()

    @property
    def ready(self) -> bool:
        """True when the model is loaded, warmed up, and the server is not draining."""
        return self._ready.is_set()

    @property
    def reason(self) -> str:
        """Why the server is not ready (or ``"ready"``)."""
        return self._reason

    @property
    def failed(self) -> bool:
        """True when startup failed for good and the process should exit."""
        return self._failed.is_set()

    def mark_ready(self) -> None:
        """Take traffic."""
        self._reason = "ready"
        self._ready.set()

    def mark_not_ready(self, reason: str) -> None:
        """Refuse new traffic for ``reason`` (warming up, shutting down, ...)."""
        self._reason = reason
        self._ready.clear()

    def mark_failed(self, reason: str) -> None:
        """Refuse traffic for good; whoever runs the server should stop it."""
        self.mark_not_ready(reason)
        self._failed.set()

    async def wait_ready(self) -> None:
        """Return once ready."""
        await self._ready.wait()

    async def wait_failed(self) -> None:
        """Return once startup has failed for good."""
        await self._failed.wait()
