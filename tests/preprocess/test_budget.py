"""PixelBudget: decodes share a count of pixels, in arrival order; too large waits to be alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import torch
from PIL import Image

from batching_server.core.errors import BadImageError, DeadlineExceededError
from batching_server.models import RESNET50
from batching_server.preprocess import Preprocessor
from batching_server.preprocess.budget import PixelBudget
from tests.images import encode, photo, photo_bytes

# Long enough never to trip on a slow machine; only a hang reaches it.
PATIENCE_S = 30.0


def eventually(condition: Callable[[], bool]) -> None:
    """Wait for a state another thread reaches (a hang fails the test, a slow machine does not)."""
    give_up = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < give_up, "the state was never reached"
        time.sleep(0.001)


def in_thread(acquire: Callable[[int], int], pixels: int) -> Future[int]:
    """``acquire(pixels)`` in a daemon thread: one left blocked by a failing test ends with it."""
    future: Future[int] = Future()
    thread = threading.Thread(target=lambda: future.set_result(acquire(pixels)), daemon=True)
    thread.start()
    return future


def test_takers_that_fit_do_not_wait() -> None:
    budget = PixelBudget(100)
    assert budget.acquire(60) == 60
    assert budget.acquire(40) == 40
    assert budget.held == 100
    budget.release(60)
    budget.release(40)
    assert budget.held == 0


def test_a_taker_that_does_not_fit_waits_for_a_release() -> None:
    budget = PixelBudget(100)
    budget.acquire(60)
    second = in_thread(budget.acquire, 60)
    eventually(lambda: budget.waiting == 1)
    assert not second.done()
    budget.release(60)
    assert second.result(timeout=PATIENCE_S) == 60
    assert budget.held == 60


def test_an_image_over_the_whole_budget_decodes_alone() -> None:
    """Never refused and never stuck: it waits until nothing is held, then holds everything."""
    budget = PixelBudget(100)
    budget.acquire(10)
    huge = in_thread(budget.acquire, 10_000)
    eventually(lambda: budget.waiting == 1)
    assert not huge.done()
    budget.release(10)
    assert huge.result(timeout=PATIENCE_S) == 100
    small = in_thread(budget.acquire, 1)
    eventually(lambda: budget.waiting == 1)
    assert not small.done()
    budget.release(100)
    assert small.result(timeout=PATIENCE_S) == 1


def test_takers_are_served_in_arrival_order() -> None:
    """A small image that would fit does not overtake a large one: no starvation."""
    budget = PixelBudget(100)
    budget.acquire(90)
    large = in_thread(budget.acquire, 50)
    eventually(lambda: budget.waiting == 1)
    small = in_thread(budget.acquire, 5)
    eventually(lambda: budget.waiting == 2)
    assert not small.done()
    budget.release(90)
    assert large.result(timeout=PATIENCE_S) == 50
    assert small.result(timeout=PATIENCE_S) == 5
    assert budget.held == 55


def budgeted(pixels: int) -> Preprocessor:
    return Preprocessor(
        transform=RESNET50.transform("random"),
        max_image_pixels=10**8,
        max_pixels_in_flight=pixels,
    )


def test_a_decode_holds_its_pixels_until_the_tensor_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prep = budgeted(10**7)
    assert prep.budget is not None
    budget = prep.budget
    seen: list[tuple[int, tuple[int, int]]] = []
    to_tensor = prep.to_tensor

    def recording(image: Image.Image) -> torch.Tensor:
        seen.append((budget.held, image.size))
        return to_tensor(image)

    monkeypatch.setattr(prep, "to_tensor", recording)
    prep(encode(photo().resize((640, 480)), "PNG"))
    assert seen == [(640 * 480, (640, 480))]
    assert budget.held == 0


def test_a_drafted_jpeg_holds_the_pixels_it_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget counts what will be decoded: a JPEG's draft scale, not its full size."""
    prep = budgeted(10**7)
    assert prep.budget is not None
    taken: list[int] = []
    acquire = prep.budget.acquire

    def recording(pixels: int, *, timeout_s: float | None = None) -> int:
        taken.append(pixels)
        return acquire(pixels, timeout_s=timeout_s)

    monkeypatch.setattr(prep.budget, "acquire", recording)
    prep(encode(photo().resize((2000, 1500)), "JPEG"))
    assert taken == [500 * 375]  # 1/4 scale: the short side stays >= 1.5 x 232


def test_a_refused_image_gives_its_pixels_back() -> None:
    prep = budgeted(10**7)
    assert prep.budget is not None
    data = photo_bytes("astronaut.png", "PNG")
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        prep(data[: len(data) // 2])
    assert prep.budget.held == 0


def test_concurrent_decodes_never_hold_more_than_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four threads, images of 40% of the budget: at most two decode at once."""
    prep = budgeted(2 * 400 * 300 + 10)
    assert prep.budget is not None
    budget = prep.budget
    lock = threading.Lock()
    held: list[int] = []
    to_tensor = prep.to_tensor

    def recording(image: Image.Image) -> torch.Tensor:
        with lock:
            held.append(budget.held)
        return to_tensor(image)

    monkeypatch.setattr(prep, "to_tensor", recording)
    data = encode(photo().resize((400, 300)), "PNG")
    with ThreadPoolExecutor(max_workers=4) as threads:
        futures = [threads.submit(prep, data) for _ in range(12)]
        for future in futures:
            assert future.result(timeout=PATIENCE_S).shape == (3, 224, 224)
    assert len(held) == 12
    assert max(held) <= budget.pixels
    assert budget.held == 0


def test_a_taker_gives_up_at_its_timeout_and_leaves_the_queue() -> None:
    budget = PixelBudget(100)
    budget.acquire(100)
    with pytest.raises(TimeoutError):
        budget.acquire(10, timeout_s=0)
    with pytest.raises(TimeoutError):
        budget.acquire(10, timeout_s=-1.0)  # a deadline already past
    assert budget.waiting == 0
    budget.release(100)
    assert budget.acquire(10, timeout_s=0) == 10  # free now: no wait needed


def test_a_decode_still_waiting_for_its_pixels_at_its_deadline_is_not_decoded() -> None:
    """The deadline check before a decode starts does not cover its wait for the budget."""
    prep = budgeted(10_000)
    prep.budget.acquire(10_000)  # another decode holds the whole budget
    data = encode(photo(), "PNG")
    result: Future[Any] = Future()

    def decode() -> None:
        try:
            result.set_result(prep(data, deadline=time.monotonic() + 0.05))
        except Exception as exc:
            result.set_exception(exc)

    threading.Thread(target=decode, daemon=True).start()
    with pytest.raises(DeadlineExceededError, match=r"limits\.max_decode_pixels_in_flight"):
        result.result(timeout=PATIENCE_S)
    assert prep.budget.waiting == 0
    prep.budget.release(10_000)
    assert prep(data, deadline=time.monotonic() + PATIENCE_S).shape == (3, 224, 224)
