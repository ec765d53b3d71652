"""Worker threads run at a lower priority than the event loop, and their OpenMP teams too."""

from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from batching_server.appkeys import PREPROCESS_POOL
from batching_server.model import load_classifier
from batching_server.threads import configure_worker_thread, thread_niceness
from tests.conftest import AppClient, make_settings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def niceness_of_every_thread() -> list[int]:
    """The nice value of each thread of this process, from /proc (field 19 of stat)."""
    values = []
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        values.append(int(stat.rsplit(")", 1)[1].split()[16]))
    return values


def test_configure_worker_thread_lowers_only_that_thread() -> None:
    base = thread_niceness()

    def configured() -> tuple[int, int]:
        configure_worker_thread(torch_threads=1, niceness=3)
        return thread_niceness(), torch.get_num_threads()

    with ThreadPoolExecutor(1) as worker:
        assert worker.submit(configured).result() == (min(19, base + 3), 1)
    assert thread_niceness() == base


def test_zero_niceness_leaves_the_thread_alone() -> None:
    base = thread_niceness()
    with ThreadPoolExecutor(1) as worker:
        worker.submit(configure_worker_thread, torch_threads=1, niceness=0).result()
        assert worker.submit(thread_niceness).result() == base


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs an OpenMP team of two")
async def test_model_thread_and_its_openmp_workers_are_lowered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = thread_niceness()
    niceness = 7  # a value no other thread of the test session has
    settings = make_settings(model={"num_threads": 2})
    classifier = load_classifier(settings.model, batching=settings.batching, niceness=niceness)
    seen: list[int] = []
    forward = classifier.forward

    def recording(pixels: torch.Tensor) -> Any:
        seen.append(thread_niceness())
        return forward(pixels)

    monkeypatch.setattr(classifier, "forward", recording)
    try:
        await classifier.warmup([2])
        assert seen == [base + niceness]
        # The model thread and the OpenMP worker it started for the forward pass.
        assert niceness_of_every_thread().count(base + niceness) >= 2
        assert thread_niceness() == base  # the event loop's thread keeps its priority
    finally:
        classifier.close()


async def test_decode_pool_threads_are_lowered(app_client: AppClient) -> None:
    base = thread_niceness()
    client = await app_client(server={"worker_niceness": 5})
    pool = client.app[PREPROCESS_POOL]
    assert await asyncio.wrap_future(pool.submit(thread_niceness)) == base + 5
    assert thread_niceness() == base
