"""Mixed load: every request gets exactly one answer, and the server's counters agree.

Valid, invalid, oversized, over-queue, expired and cancelled requests, in flight together
against a gated model; afterwards the client's tally by status class must equal the server's
``http_requests_total``, and the drops by reason must equal ``batch_dropped_total``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiohttp import FormData

from batching_server.http.appkeys import BATCHER
from batching_server.models import ModelRunner
from tests.conftest import AppClient
from tests.fakes import SpyRunner
from tests.images import encode, photo, photo_bytes
from tests.metrics_text import scrape

JPEG = photo_bytes("chelsea.png")
BIG = encode(photo("astronaut.png"), "JPEG")  # 512x512: over the pixel limit set below


def form(content: bytes) -> FormData:
    data = FormData()
    data.add_field("file", content, filename="x.jpg", content_type="image/jpeg")
    return data


@pytest.mark.slow
async def test_every_request_is_answered_once_and_counted(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    spy = SpyRunner(classifier)
    spy.gate.clear()
    client = await app_client(
        model=spy,
        batching={"max_batch_size": 2, "max_queue_size": 4, "max_wait_ms": 50.0},
        limits={"max_files_per_request": 2, "max_image_pixels": 400 * 400},
    )
    post = client.post

    def send(kind: str, content: bytes, **headers: str) -> tuple[str, asyncio.Task[Any]]:
        return kind, asyncio.create_task(post("/predict", data=form(content), headers=headers))

    batcher = client.app[BATCHER]

    async def queue_reaches(size: int) -> None:
        for _ in range(500):  # bounded wait for the server to get there
            if batcher.queue_size == size:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"queue stayed at {batcher.queue_size}, expected {size}")

    first = [send("valid", JPEG) for _ in range(2)]
    await spy.started.wait()  # the model is now held by the first batch
    cancelled = [send("cancelled", JPEG) for _ in range(2)]
    expired = [send("expired", JPEG, **{"X-Request-Timeout": "0.2"}) for _ in range(2)]
    await queue_reaches(4)
    for _, task in cancelled:
        task.cancel()
    await queue_reaches(0)  # the cancelled left the queue, and the expired timed out of it
    rest = [send("valid", JPEG) for _ in range(6)]  # 4 fit the queue; 2 get 503
    rest += [send("invalid", b"not an image") for _ in range(3)]
    rest += [send("oversized", BIG) for _ in range(2)]
    await queue_reaches(4)
    spy.gate.set()

    tally: Counter[str] = Counter()
    by_kind: Counter[tuple[str, int]] = Counter()
    for kind, task in [*first, *cancelled, *expired, *rest]:
        try:
            response = await task
        except asyncio.CancelledError:
            tally["4xx"] += 1  # the server counts a vanished client as 499
            by_kind[(kind, 499)] += 1
            continue
        await response.read()
        tally[f"{response.status // 100}xx"] += 1
        by_kind[(kind, response.status)] += 1

    assert by_kind == {
        ("valid", 200): 6,
        ("valid", 503): 2,
        ("cancelled", 499): 2,
        ("expired", 504): 2,
        ("invalid", 400): 3,
        ("oversized", 413): 2,
    }
    assert tally == {"2xx": 6, "4xx": 7, "5xx": 4}  # 17 requests, 17 outcomes

    for _ in range(200):  # bounded: until the server has seen every disconnect
        samples = await scrape(client)
        server = Counter(
            {
                dict(labels)["status"]: value
                for (name, labels), value in samples.items()
                if name == "http_requests_total" and dict(labels)["endpoint"] == "/predict"
            }
        )
        if server == tally:
            break
        await asyncio.sleep(0.01)
    assert server == tally
    dropped = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "batch_dropped_total"
    }
    assert dropped == {"rejected": 2, "cancelled": 2, "expired": 2, "aborted": 0}
