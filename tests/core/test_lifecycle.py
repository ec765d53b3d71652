"""The app's lifecycle around the batcher: a watched, bounded drain, a watched warm-up, and a
dead dispatcher that fails the server instead of leaving it answering 500 to everything.

Stalls are made with a fake clock that the app's batcher and watchdog read, so no test
depends on how fast this machine is; waits on real time are only bounds, never asserts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import torch
from aiohttp import web

from batching_server.core.errors import BatcherClosedError, ModelStalledError
from batching_server.core.readiness import ExitCode, Readiness
from batching_server.http.app import create_app
from batching_server.http.appkeys import BATCHER, READINESS
from batching_server.models import ModelRunner
from batching_server.models.runner import ImageInput
from batching_server.settings import Settings
from tests.conftest import make_settings
from tests.fakes import FakeClock, SpyRunner

BOUND_S = 30  # only a bound against hanging forever: every wait here ends on an event


def image() -> ImageInput:
    return ImageInput(pixels=torch.zeros(3, 224, 224), request_id="lifecycle-test")


@pytest.fixture
def spy(classifier: ModelRunner) -> Iterator[SpyRunner]:
    """The shared model behind a spy; whatever the test held, it lets go at the end."""
    spy = SpyRunner(classifier)
    yield spy
    spy.gate.set()
    spy.warmup_gate.set()


def app_for(spy: SpyRunner, settings: Settings, **options: Any) -> web.Application:
    return create_app(settings, runner=cast(ModelRunner, spy), **options)


async def started(app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    return runner


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition()`` holds (a bounded number of rounds)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_a_pass_that_hangs_during_the_drain_is_a_stall(spy: SpyRunner) -> None:
    clock = FakeClock()
    spy.gate.clear()  # the forward pass never returns
    app = app_for(spy, make_settings(model={"stall_timeout_s": 5.0}), clock=clock)
    runner = await started(app)
    readiness, batcher = app[READINESS], app[BATCHER]
    await readiness.wait_ready()
    hung = asyncio.create_task(batcher.submit(image()))
    await spy.started.wait()
    cleanup = asyncio.create_task(runner.cleanup())
    await until(lambda: batcher.closed)  # the drain has begun, waiting on the hung pass
    assert not readiness.failed
    clock.now = 6.0  # the pass has now run past model.stall_timeout_s
    await asyncio.wait_for(cleanup, BOUND_S)
    assert readiness.exit_code == ExitCode.MODEL_STALLED
    with pytest.raises(ModelStalledError):
        await hung


async def test_the_drain_is_bounded_by_the_graceful_shutdown_timeout(spy: SpyRunner) -> None:
    spy.gate.clear()  # the forward pass never returns, and no watchdog would notice
    settings = make_settings(
        server={"graceful_shutdown_timeout_s": 0}, model={"stall_timeout_s": 0}
    )
    app = app_for(spy, settings)
    runner = await started(app)
    readiness = app[READINESS]
    await readiness.wait_ready()
    hung = asyncio.create_task(app[BATCHER].submit(image()))
    await spy.started.wait()
    await asyncio.wait_for(runner.cleanup(), BOUND_S)
    assert readiness.exit_code == ExitCode.DRAIN_TIMED_OUT
    assert "1 images unserved" in readiness.reason
    with pytest.raises(BatcherClosedError, match="drain ran out of time") as raised:
        await hung
    assert raised.value.error_type == "shutting_down"


async def test_a_warmup_pass_that_hangs_is_a_stall(spy: SpyRunner) -> None:
    clock = FakeClock()
    spy.warmup_gate.clear()  # the first warm-up pass never returns
    settings = make_settings(
        model={"warmup": True, "stall_timeout_s": 5.0}, batching={"max_batch_size": 2}
    )
    app = app_for(spy, settings, clock=clock)
    runner = await started(app)
    readiness = app[READINESS]
    await spy.warmup_started.wait()
    clock.now = 6.0
    await asyncio.wait_for(readiness.wait_failed(), BOUND_S)
    assert readiness.exit_code == ExitCode.MODEL_STALLED
    assert "model stalled" in readiness.reason
    assert "(limit 5 s," in readiness.reason
    assert spy.warmed_sizes == [1]  # one shape at a time: the first one hung
    await asyncio.wait_for(runner.cleanup(), BOUND_S)


async def test_a_dead_dispatcher_fails_the_server(
    aiohttp_client: Any, classifier: ModelRunner
) -> None:
    clock = FakeClock()
    app = create_app(make_settings(), runner=classifier, clock=clock)
    client = await aiohttp_client(app)
    readiness = app[READINESS]
    await readiness.wait_ready()
    assert (await client.get("/health")).status == 200
    clock.error = RuntimeError("a bug on the dispatcher's path")
    with app[BATCHER].expecting():
        pass  # wakes the dispatcher, which reads the clock and dies
    await asyncio.wait_for(readiness.wait_failed(), BOUND_S)
    clock.error = None
    assert readiness.exit_code == ExitCode.BATCHER_FAILED
    health = await client.get("/health")
    assert health.status == 503
    ready = await client.get("/ready")
    assert ready.status == 503
    assert "the batcher stopped: RuntimeError" in (await ready.json())["reason"]


async def test_the_first_failure_decides_the_exit_status() -> None:
    readiness = Readiness()
    readiness.mark_failed("model stalled", exit_code=ExitCode.MODEL_STALLED)
    # The drain that then runs out of time behind the hung pass is a consequence.
    readiness.mark_failed("drain timed out", exit_code=ExitCode.DRAIN_TIMED_OUT)
    assert readiness.exit_code == ExitCode.MODEL_STALLED
    assert readiness.reason == "model stalled"
    readiness.mark_not_ready("shutting down")
    assert readiness.reason == "model stalled"
