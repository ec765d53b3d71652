"""benchmarks.load_procs: how a load point is split over client processes."""

from __future__ import annotations

import pytest

from benchmarks.load_procs import shares


@pytest.mark.parametrize(
    ("total", "procs", "expected"),
    [(64, 4, [16, 16, 16, 16]), (10, 4, [3, 3, 2, 2]), (2, 4, [1, 1, 0, 0]), (1, 1, [1])],
)
def test_clients_are_split_evenly(total: int, procs: int, expected: list[int]) -> None:
    assert shares(total, procs) == expected
    assert sum(shares(total, procs)) == total
