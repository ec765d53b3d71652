"""Worker threads: how the cores are shared out among forward passes, and their priority
(below the event loop's, their OpenMP teams' too)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from batching_server.app import create_app
from batching_server.appkeys import BATCHER, CLASSIFIER, PREPROCESS_POOL
from batching_server.model import load_classifier
from batching_server.threads import (
    ThreadPlan,
    available_cores,
    configure_worker_thread,
    plan_threads,
    run_queue_clock,
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


def policy_of_every_thread() -> list[int]:
    return _stat_field_of_every_thread(41)


def thread_policy() -> int:
    """The calling thread's scheduling policy (``os.SCHED_*``)."""
    return os.sched_getscheduler(threading.get_native_id())


def test_configure_worker_thread_lowers_only_that_thread() -> None:
    base = thread_niceness()

    def configured() -> tuple[int, int]:
        configure_worker_thread(torch_threads=1, niceness=3)
        return thread_niceness(), torch.get_num_threads()

    with ThreadPoolExecutor(1) as worker:
        assert worker.submit(configured).result() == (min(19, base + 3), 1)
    assert thread_niceness() == base


def test_idle_puts_only_that_thread_under_sched_idle() -> None:
    base = thread_niceness()

    def configured() -> tuple[int, int]:
        configure_worker_thread(torch_threads=1, niceness=3, idle=True)
        return thread_policy(), thread_niceness()

    with ThreadPoolExecutor(1) as worker:
        # The nice value is left alone: it means nothing under SCHED_IDLE.
        assert worker.submit(configured).result() == (os.SCHED_IDLE, base)
    assert thread_policy() == os.SCHED_OTHER


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


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs an OpenMP team of two")
async def test_sched_idle_puts_decode_model_and_openmp_threads_under_it(
    aiohttp_client: Any,
) -> None:
    settings = make_settings(server={"sched_idle": True}, model={"warmup": False, "num_threads": 2})
    client = await aiohttp_client(create_app(settings))
    idle_before = policy_of_every_thread().count(os.SCHED_IDLE)
    await client.app[CLASSIFIER].warmup([2])  # starts a model thread and its OpenMP worker
    pool = client.app[PREPROCESS_POOL]
    assert await asyncio.wrap_future(pool.submit(thread_policy)) == os.SCHED_IDLE
    # The decode thread, the model thread and the OpenMP worker it started for the pass.
    assert policy_of_every_thread().count(os.SCHED_IDLE) >= idle_before + 3
    assert thread_policy() == os.SCHED_OTHER  # the event loop's thread keeps its policy


async def test_decode_pool_threads_are_lowered(app_client: AppClient) -> None:
    base = thread_niceness()
    client = await app_client(server={"worker_niceness": 5})
    pool = client.app[PREPROCESS_POOL]
    assert await asyncio.wrap_future(pool.submit(thread_niceness)) == base + 5
    assert thread_niceness() == base


async def test_model_and_decode_threads_get_their_own_niceness(aiohttp_client: Any) -> None:
    base = thread_niceness()
    settings = make_settings(
        server={"worker_niceness": 4, "model_niceness": 13},  # values no other test uses
        model={"warmup": False},
        batching={"max_batch_size": 1},
    )
    client = await aiohttp_client(create_app(settings))
    await client.app[CLASSIFIER].warmup([1])  # starts a model thread
    pool = client.app[PREPROCESS_POOL]
    assert await asyncio.wrap_future(pool.submit(thread_niceness)) == min(19, base + 4)
    assert await asyncio.wrap_future(pool.submit(thread_policy)) == os.SCHED_OTHER
    assert min(19, base + 13) in niceness_of_every_thread()
    assert thread_niceness() == base


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
    classifier = load_classifier(settings.model, batching=settings.batching)
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


def test_run_queue_clock_reads_the_wait_for_a_core_not_the_time_on_it() -> None:
    # This thread and a nice-10 busy process share one core: this thread, always runnable,
    # is either on the core or waiting for it, and gets about ten elevenths of it.
    core = min(os.sched_getaffinity(0))
    me = threading.get_native_id()
    hog_code = (
        f"import os, time\nos.sched_setaffinity(0, {{{core}}})\nos.nice(10)\n"
        "print(flush=True)\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"
    )
    previous = os.sched_getaffinity(me)
    with subprocess.Popen([sys.executable, "-c", hog_code], stdout=subprocess.PIPE) as hog:
        try:
            assert hog.stdout is not None
            hog.stdout.readline()  # it is pinned and about to spin
            os.sched_setaffinity(me, {core})
            with run_queue_clock() as waited_s:
                assert waited_s is not None
                wall, cpu, waited = time.monotonic(), time.thread_time(), waited_s()
                while time.monotonic() - wall < 0.5:
                    pass
                wall = time.monotonic() - wall
                cpu = time.thread_time() - cpu
                waited = waited_s() - waited
        finally:
            os.sched_setaffinity(me, previous)
            hog.kill()
    assert 0 < waited < wall / 2  # the time on the core would be most of it
    assert waited == pytest.approx(wall - cpu, abs=0.1)
