"""Allowed batch shapes: which padded size a batch runs at, and which shapes warm-up covers.

Pure arithmetic on the batching settings, shared by the model runner (padding, warm-up) and
the metrics (padding counted per batch).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["padded_size", "warmup_sizes"]


def padded_size(size: int, batch_sizes: Sequence[int]) -> int:
    """The smallest allowed batch size that holds ``size`` images (``size`` if any goes)."""
    for allowed in batch_sizes:
        if allowed >= size:
            return allowed
    return size


def warmup_sizes(max_batch_size: int, batch_sizes: Sequence[int]) -> list[int]:
    """Every batch shape a forward pass can see, so warm-up can run (and compile) each."""
    return sorted({padded_size(n, batch_sizes) for n in range(1, max_batch_size + 1)})
