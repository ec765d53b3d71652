"""Worker threads: how the cores are shared out among forward passes, and their priority
(below the event loop's, their OpenMP teams' too)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.models import resnet50

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


# Run in a fresh interpreter: the test session's own threads (pytest's, the shared
# classifier's) already hold OpenMP teams of their own.
_OPENMP_TEAMS_SCRIPT = """
import asyncio, os, sys, time

import numpy, torch  # their own native threads, if any, start here: before the baseline
from aiohttp.test_utils import TestClient, TestServer

from batching_server.http.app import create_app
from batching_server.http.appkeys import READINESS
from tests.conftest import make_settings
from tests.images import photo_bytes


def openmp_workers():
    # Threads blocked in libgomp: the idle workers of OpenMP teams (a busy one spins).
    libgomp = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libgomp" in line:
                start, end = line.split()[0].split("-")
                libgomp.append((int(start, 16), int(end, 16)))
    workers = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/syscall") as syscall:
                fields = syscall.read().split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        if fields[0] != "running":  # the last field is the thread's user-space PC
            pc = int(fields[-1], 16)
            if any(start <= pc < end for start, end in libgomp):
                workers.add(int(tid))
    return workers


async def main():
    baseline = openmp_workers()
    settings = make_settings(
        model={"warmup": True, "num_threads": 2, "weights": sys.argv[1]},
        batching={"max_batch_size": 2},
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        await asyncio.wait_for(client.app[READINESS].wait_ready(), 120)
        response = await client.post("/predict", data={"file": photo_bytes()})
        assert response.status == 200, await response.text()
        # A thread that ended takes its team with it, but its workers end a moment later;
        # and a worker spins a moment after each parallel region before it blocks.
        deadline = time.monotonic() + 30
        while True:
            workers = openmp_workers() - baseline
            if len(workers) == 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        print(len(workers))


asyncio.run(main())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs an OpenMP team of two")
@pytest.mark.parametrize("checkpoint", [False, True], ids=["random", "checkpoint"])
def test_only_the_model_threads_keep_openmp_teams(checkpoint: bool, tmp_path: Path) -> None:
    # libgomp keeps a team for every thread that ran a parallel region, and once the
    # process's OpenMP threads outnumber the cores, every team's workers sleep at each
    # barrier: a forward pass then pays hundreds of wake-ups. Loading the model (copying a
    # checkpoint's tensors is a parallel region), warming it up and serving must leave only
    # the one model thread's team: its one extra worker.
    weights = "random"
    if checkpoint:
        weights = str(tmp_path / "resnet50.pt")
        torch.save(resnet50(weights=None).state_dict(), weights)
    result = subprocess.run(
        [sys.executable, "-c", _OPENMP_TEAMS_SCRIPT, weights],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).parents[2],
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "1", result.stdout
