"""Allowed batch shapes: padding up to the next allowed size, and the shapes warm-up covers."""

from __future__ import annotations

import pytest

from batching_server.core.shapes import padded_size, warmup_sizes


@pytest.mark.parametrize(
    ("size", "allowed", "expected"),
    [
        (1, (1, 2, 4, 8), 1),
        (3, (1, 2, 4, 8), 4),
        (5, (1, 2, 4, 8), 8),
        (8, (1, 2, 4, 8), 8),
        (3, (), 3),
        (6, (4,), 6),
    ],
)
def test_padded_size(size: int, allowed: tuple[int, ...], expected: int) -> None:
    assert padded_size(size, allowed) == expected


def test_warmup_sizes_cover_every_shape_the_batcher_can_produce() -> None:
    assert warmup_sizes(8, ()) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert warmup_sizes(6, (1, 2, 4, 8)) == [1, 2, 4, 8]
    assert warmup_sizes(3, (2, 16)) == [2, 16]
