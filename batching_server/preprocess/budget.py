"""``PixelBudget``: how many pixels the decode threads may hold decoded at once, shared."""

from __future__ import annotations

import itertools
import threading
from collections import deque

__all__ = ["PixelBudget"]


class PixelBudget:
    """A count of pixels that decodes take before decoding and give back after the tensor.

    Decode memory grows with pixels, not with requests: a few large images at once are what
    exhausts memory. Takers are served in arrival order, so a large image is not starved by
    a stream of small ones. An image larger than the whole budget waits until nothing else
    is held, then decodes alone: it is never refused here (``limits.max_image_pixels`` does
    that) and never waits forever.
    """

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError(f"a pixel budget must be positive, not {pixels}")
        self.pixels = pixels
        self._held = 0
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()
        self._changed = threading.Condition()

    @property
    def held(self) -> int:
        """Pixels held now."""
        with self._changed:
            return self._held

    @property
    def waiting(self) -> int:
        """Takers waiting for their turn or for pixels."""
        with self._changed:
            return len(self._queue)

    def acquire(self, pixels: int, *, timeout_s: float | None = None) -> int:
        """Wait until ``pixels`` (at most the whole budget) are free and take them; return them.

        Raises ``TimeoutError`` when ``timeout_s`` passes first (at once when it is not
        positive and the pixels are not free).
        """
        wanted = max(0, min(pixels, self.pixels))
        with self._changed:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                granted = self._changed.wait_for(
                    lambda: self._queue[0] == ticket and self._held + wanted <= self.pixels,
                    timeout=None if timeout_s is None else max(0.0, timeout_s),
                )
            finally:
                # Served, timed out or interrupted: either way the queue moves on.
                self._queue.remove(ticket)
                self._changed.notify_all()
            if not granted:
                raise TimeoutError(f"{wanted} pixels were not free within {timeout_s} s")
            self._held += wanted
            return wanted

    def release(self, pixels: int) -> None:
        """Give back what ``acquire`` returned."""
        with self._changed:
            self._held -= pixels
            self._changed.notify_all()
