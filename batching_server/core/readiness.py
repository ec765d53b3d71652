"""Readiness: whether the server should take traffic now, and if not, why."""

from __future__ import annotations

import asyncio
import enum

__all__ = ["ExitCode", "Readiness"]


class ExitCode(enum.IntEnum):
    """The process's exit statuses, so that whoever restarts it can tell them apart."""

    OK = 0
    STARTUP_FAILED = 1  # warm-up failed after the model loaded
    BAD_SETTINGS = 2
    MODEL_LOAD_FAILED = 3
    MODEL_STALLED = 4  # a forward pass hung past model.stall_timeout_s
    BATCHER_FAILED = 5  # the batcher's dispatcher died of a bug: every request would fail
    DRAIN_TIMED_OUT = 6  # server.graceful_shutdown_timeout_s passed with images unserved
    # A second SIGINT or SIGTERM during the drain stops the process at once: 128 + the
    # signal's number, as a shell reports a process that signal killed, since the operator
    # asked for exactly that.
    FORCED_BY_SIGINT = 130
    FORCED_BY_SIGTERM = 143


class Readiness:
    """Tracks the lifecycle: starting, warming up, ready, shutting down, or failed."""

    def __init__(self) -> None:
        self._reason = "starting"
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()
        self._exit_code = ExitCode.OK

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
        """True when the server failed for good and the process should exit."""
        return self._failed.is_set()

    @property
    def exit_code(self) -> ExitCode:
        """The status the process should exit with, given what has happened so far."""
        return self._exit_code

    def mark_ready(self) -> None:
        """Take traffic."""
        self._reason = "ready"
        self._ready.set()

    def mark_not_ready(self, reason: str) -> None:
        """Refuse new traffic for ``reason`` (warming up, shutting down, ...)."""
        if not self.failed:  # a failure's reason is the one that matters until exit
            self._reason = reason
        self._ready.clear()

    def mark_failed(self, reason: str, *, exit_code: ExitCode = ExitCode.STARTUP_FAILED) -> None:
        """Refuse traffic for good; whoever runs the server should stop it.

        The first failure wins: a later one (a drain that times out behind a stalled model,
        say) is a consequence, and the cause is what the exit status must tell.
        """
        self._ready.clear()
        if self.failed:
            return
        self._reason = reason
        self._exit_code = exit_code
        self._failed.set()

    async def wait_ready(self) -> None:
        """Return once ready."""
        await self._ready.wait()

    async def wait_failed(self) -> None:
        """Return once the server has failed for good."""
        await self._failed.wait()
