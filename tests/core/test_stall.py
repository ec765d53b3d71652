"""A forward pass that hangs: the watchdog notices, the app fails fast and says why."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import FormData

from batching_server.core.readiness import ExitCode
from batching_server.core.watchdog import PassTimer, StallWatchdog
from batching_server.http.appkeys import BATCHER, READINESS
from batching_server.models import ModelRunner
from tests.conftest import AppClient, make_settings
from tests.fakes import FakeClock, SpyRunner
from tests.images import photo_bytes
from tests.metrics_text import scrape, value

JPEG = photo_bytes("chelsea.png")


class Running:
    """Stands in for the batcher: its longest running batch is whatever the test says."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def longest_running_s(self) -> float:
        return self.seconds


def form() -> FormData:
    data = FormData()
    data.add_field("file", JPEG, filename="x.jpg", content_type="image/jpeg")
    return data


def test_watchdog_reports_once_and_only_past_the_timeout() -> None:
    running = Running()
    reports: list[float] = []
    watchdog = StallWatchdog(running, stall_timeout_s=5.0, on_stall=reports.append)
    running.seconds = 5.0  # at the timeout is not past it
    assert watchdog.check() is False
    running.seconds = 5.5
    assert watchdog.check() is True
    running.seconds = 9.0
    assert watchdog.check() is True
    assert reports == [5.5]


def test_watchdog_polls_often_enough_for_its_timeout() -> None:
    assert StallWatchdog(Running(), stall_timeout_s=0.2, on_stall=print).interval_s == 0.05
    assert StallWatchdog(Running(), stall_timeout_s=600, on_stall=print).interval_s == 1.0
    with pytest.raises(ValueError, match="stall_timeout_s must be positive"):
        StallWatchdog(Running(), stall_timeout_s=0, on_stall=print)


def test_pass_timer_times_the_oldest_pass_still_running() -> None:
    clock = FakeClock(100.0)
    passes = PassTimer(clock=clock)
    assert passes.longest_running_s() == 0.0
    with passes.running():
        clock.now = 103.0
        with passes.running():
            clock.now = 110.0
            assert passes.longest_running_s() == 10.0  # the older of the two
        assert passes.longest_running_s() == 10.0
    assert passes.longest_running_s() == 0.0


def test_watchdog_reports_a_stall_in_any_of_what_it_watches() -> None:
    batches, warmup = Running(), Running()
    reports: list[float] = []
    watchdog = StallWatchdog(batches, warmup, stall_timeout_s=5.0, on_stall=reports.append)
    batches.seconds = 1.0
    assert watchdog.check() is False
    warmup.seconds = 7.0  # a warm-up pass hangs while no batch does
    assert watchdog.check() is True
    assert reports == [7.0]


async def test_run_returns_once_it_has_reported() -> None:
    running = Running()
    reports: list[float] = []
    watchdog = StallWatchdog(running, stall_timeout_s=1.0, on_stall=reports.append, interval_s=0)
    task = asyncio.create_task(watchdog.run())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()  # nothing runs long: it keeps watching
    running.seconds = 2.0
    await task
    assert reports == [2.0]


async def test_a_hung_forward_pass_fails_the_server_with_reasons(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    spy = SpyRunner(classifier)
    spy.gate.clear()  # the forward pass never returns
    client = await app_client(
        make_settings(
            model={"weights": "random", "warmup": False, "device": "cpu", "stall_timeout_s": 0.2},
            batching={"max_batch_size": 1, "max_wait_ms": 0.0},
        ),
        model=spy,
    )
    hung = asyncio.create_task(client.post("/predict", data=form()))
    await spy.started.wait()
    queued = asyncio.create_task(client.post("/predict", data=form()))
    batcher = client.app[BATCHER]
    for _ in range(500):  # bounded wait until the second request is queued
        if batcher.queue_size:
            break
        await asyncio.sleep(0.01)
    assert batcher.queue_size == 1

    readiness = client.app[READINESS]
    await asyncio.wait_for(readiness.wait_failed(), timeout=30)
    assert readiness.exit_code == ExitCode.MODEL_STALLED

    for pending in (hung, queued):
        response = await pending
        assert response.status == 503
        body: dict[str, Any] = await response.json()
        assert body["error"]["type"] == "model_stalled"
        assert "stalled" in body["error"]["message"]
        assert response.headers["Retry-After"] == "10"  # after the restart
    ready = await client.get("/ready")
    assert ready.status == 503
    assert "model stalled" in (await ready.json())["reason"]
    health = await client.get("/health")
    assert health.status == 503
    assert (await health.json())["status"] == "unhealthy"
    again = await client.post("/predict", data=form())
    assert again.status == 503
    assert spy.batch_sizes == [1]  # the queued image never reached the model
    samples = await scrape(client)
    assert value(samples, "batch_dropped_total", reason="aborted") == 1
