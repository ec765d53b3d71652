"""Worker threads: how the cores are shared out among forward passes, and their priority
(below the event loop's, their OpenMP teams' too)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from batching_server.http.app import create_app
from batching_server.http.appkeys import BATCHER, DECODE_POOL, RUNNER
from batching_server.models import load_runner
from batching_server.models.threads import (
    ThreadPlan,
    available_cores,
    configure_worker_thread,
    plan_threads,
    thread_niceness,
)
from tests.conftest import AppClient, make_settings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def _stat_field_of_every_thread(field: int) -> list[int]:
    """Field ``field`` (numbered as in proc(5)) of each thread's stat, from /proc."""
    values = []
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        values.append(int(stat.rsplit(")", 1)[1].split()[field - 3]))
    return values


def niceness_of_every_thread() -> list[int]:
    return _stat_field_of_every_thread(19)


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
    classifier = load_runner(settings.model, batching=settings.batching, niceness=niceness)
    seen: list[int] = []
    forward = classifier.forward

    def recording(pixels: torch.Tensor, **options: Any) -> Any:
        seen.append(thread_niceness())
        return forward(pixels, **options)

    monkeypatch.setattr(classifier, "forward", recording)
    try:
        await classifier.warmup([2])
        assert seen == [base + niceness]
        # The model thread and the OpenMP worker it started for the forward pass.
        assert niceness_of_every_thread().count(base + niceness) >= 2
        assert thread_niceness() == base  # the event loop's thread keeps its priority
    finally:
        classifier.close()


async def test_decode_and_model_threads_run_below_the_loop(aiohttp_client: Any) -> None:
    base = thread_niceness()
    settings = make_settings(model={"warmup": False}, batching={"max_batch_size": 1})
    client = await aiohttp_client(create_app(settings))
    await client.app[RUNNER].warmup([1])  # starts a model thread
    pool = client.app[DECODE_POOL].executor
    assert await asyncio.wrap_future(pool.submit(thread_niceness)) == min(19, base + 10)
    model_thread = client.app[RUNNER]._executor
    assert await asyncio.wrap_future(model_thread.submit(thread_niceness)) == min(19, base + 19)
    assert thread_niceness() == base


async def test_low_priority_workers_off_leaves_every_thread_at_the_loops(
    aiohttp_client: Any,
) -> None:
    base = thread_niceness()
    settings = make_settings(
        server={"low_priority_workers": False},
        model={"warmup": False},
        batching={"max_batch_size": 1},
    )
    client = await aiohttp_client(create_app(settings))
    await client.app[RUNNER].warmup([1])
    pool = client.app[DECODE_POOL].executor
    assert await asyncio.wrap_future(pool.submit(thread_niceness)) == base
    model_thread = client.app[RUNNER]._executor
    assert await asyncio.wrap_future(model_thread.submit(thread_niceness)) == base


@pytest.mark.parametrize(
    ("cores", "device", "concurrent", "threads", "plan"),
    [
        # auto on a CPU: two passes on half the cores each; a lone image gets them all
        (2, "cpu", 0, 0, ThreadPlan(2, 1, 2)),
        (16, "cpu", 0, 0, ThreadPlan(2, 8, 16)),
        (1, "cpu", 0, 0, ThreadPlan(1, 1, 1)),  # one core: nothing to share out
        (8, "cuda", 0, 0, ThreadPlan(1, 8, 8)),  # a GPU runs one pass at a time
        (2, "cpu", 1, 0, ThreadPlan(1, 2, 2)),  # one pass: every core, always
        (2, "cpu", 4, 0, ThreadPlan(4, 1, 2)),  # more passes than cores: one thread each
        (16, "cpu", 0, 3, ThreadPlan(2, 3, 3)),  # threads set by hand: exactly that
    ],
)
def test_plan_threads(
    cores: int, device: str, concurrent: int, threads: int, plan: ThreadPlan
) -> None:
    assert (
        plan_threads(
            cores=cores, device_type=device, concurrent_batches=concurrent, num_threads=threads
        )
        == plan
    )


async def test_model_threads_and_batcher_follow_the_plan(app_client: AppClient) -> None:
    settings = make_settings(batching={"max_concurrent_batches": 0}, model={"num_threads": 0})
    classifier = load_runner(settings.model, batching=settings.batching)
    try:
        cores = available_cores()
        expected = plan_threads(cores=cores, device_type="cpu", concurrent_batches=0, num_threads=0)
        assert classifier.threads == expected
        assert expected == (
            ThreadPlan(2, max(1, cores // 2), cores) if cores > 1 else ThreadPlan(1, 1, 1)
        )
        client = await app_client(settings, model=classifier)
        assert client.app[BATCHER].max_concurrent_batches == expected.concurrent_batches
    finally:
        classifier.close()


def test_a_worker_threads_count_survives_another_thread_setting_its_own() -> None:
    """torch sets a thread's OpenMP count lazily, at its first parallel op, from the count
    some thread set last: a worker must not pick up another pool's count that way."""
    configured, go = threading.Event(), threading.Event()

    def worker() -> int:
        configure_worker_thread(torch_threads=1, niceness=0)
        configured.set()
        assert go.wait(30)
        torch.ones(512, 512).sum()  # a first parallel op in this thread
        return torch.get_num_threads()

    previous = torch.get_num_threads()
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(worker)
        assert configured.wait(30)
        torch.set_num_threads(3)  # as a model thread starting meanwhile would
        go.set()
        try:
            assert result.result(timeout=30) == 1
        finally:
            torch.set_num_threads(previous)
