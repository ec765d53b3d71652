"""The dynamic batcher, without HTTP and without wall-clock assertions.

Timing is controlled with gated fake models, exact-size fills under huge timeouts, zero
timeouts and a fake clock, so no test depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import structlog.testing

from batching_server.core.batcher import Batcher, BatchInfo, BatchPlan, ItemFailed, plan_batch
from batching_server.core.errors import (
    BadImageError,
    BatcherClosedError,
    DeadlineExceededError,
    InferenceError,
    ModelStalledError,
    QueueFullError,
)
from tests.fakes import (
    CountingDeque,
    FailingModel,
    FakeClock,
    GatedModel,
    MiscountingModel,
    RaisingObserver,
    RecordingModel,
    RecordingObserver,
)

HOUR = 3600.0  # a max_wait that never elapses: only the size trigger can dispatch


async def settle(rounds: int = 20) -> None:
    """Let every ready task run (ordering only; nothing here measures time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.fixture(autouse=True)
async def no_loop_errors() -> AsyncIterator[None]:
    """Fail on any error the loop reports: InvalidStateError, unretrieved exceptions..."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    loop.set_exception_handler(None)
    assert errors == []


def make(model: Any, **options: Any) -> Batcher[int, int]:
    options.setdefault("max_batch_size", 4)
    options.setdefault("max_wait_s", HOUR)
    options.setdefault("max_queue_size", 64)
    batcher = Batcher[int, int](model, **options)
    batcher.start()
    return batcher


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


def spawn(batcher: Batcher[int, int], *items: int, **kw: Any) -> list[asyncio.Task[int]]:
    return [asyncio.create_task(batcher.submit(item, **kw)) for item in items]


# --- the batch-forming rule, as a pure function -------------------------------------------


@pytest.mark.parametrize(
    ("queued", "oldest", "now", "draining", "expected"),
    [
        pytest.param(0, None, 5.0, False, BatchPlan(), id="empty-waits-for-arrival"),
        pytest.param(4, 0.0, 0.0, False, BatchPlan(size=4, reason="full"), id="full-now"),
        pytest.param(9, 0.0, 0.0, False, BatchPlan(size=4, reason="full"), id="full-caps-size"),
        pytest.param(2, 1.0, 1.009, False, BatchPlan(wake_at=1.01), id="not-due-yet"),
        pytest.param(2, 1.0, 1.01, False, BatchPlan(size=2, reason="timeout"), id="due"),
        pytest.param(3, 0.0, 0.0, True, BatchPlan(size=3, reason="drain"), id="draining"),
    ],
)
def test_plan_batch(
    queued: int, oldest: float | None, now: float, draining: bool, expected: BatchPlan
) -> None:
    plan = plan_batch(
        queued=queued,
        oldest_enqueued_at=oldest,
        now=now,
        max_batch_size=4,
        max_wait_s=0.01,
        draining=draining,
    )
    assert plan.size == expected.size
    assert plan.reason == expected.reason
    assert plan.wake_at == pytest.approx(expected.wake_at)


def test_plan_batch_zero_wait_dispatches_whatever_is_queued() -> None:
    plan = plan_batch(queued=1, oldest_enqueued_at=7.0, now=7.0, max_batch_size=8, max_wait_s=0)
    assert plan == BatchPlan(size=1, reason="timeout")


# --- triggers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        pytest.param(None, BatchPlan(wake_at=1.01), id="not-tracked-waits"),
        pytest.param(1, BatchPlan(wake_at=1.01), id="one-on-its-way-waits"),
        pytest.param(0, BatchPlan(size=2, reason="idle"), id="none-on-its-way-goes"),
    ],
)
def test_plan_batch_goes_at_once_when_nothing_is_on_its_way(
    incoming: int | None, expected: BatchPlan
) -> None:
    plan = plan_batch(
        queued=2,
        oldest_enqueued_at=1.0,
        now=1.0,
        max_batch_size=4,
        max_wait_s=0.01,
        incoming=incoming,
    )
    assert plan == expected


async def test_dispatch_when_idle_waits_only_while_a_caller_is_expected(
    observer: RecordingObserver,
) -> None:
    model = RecordingModel()
    batcher = make(model, dispatch_when_idle=True, observer=observer)
    with batcher.expecting():
        first = spawn(batcher, 1)
        await settle()
        assert batcher.queue_size == 1  # another caller is on its way: the batch waits
        second = spawn(batcher, 2)
        await settle()
        assert model.batches == []
    assert [await first[0], await second[0]] == [10, 20]
    assert model.batches == [[1, 2]]  # the last expected caller left: it went, with both
    assert [info.reason for info in observer.dispatched] == ["idle"]
    third = spawn(batcher, 3)  # nobody is expected at all: no wait
    assert await third[0] == 30
    await batcher.close()


async def test_expecting_is_ignored_without_dispatch_when_idle() -> None:
    model = RecordingModel()
    batcher = make(model)  # max_wait is an hour and the batch is never full
    with batcher.expecting():
        pass
    task = spawn(batcher, 1)
    await settle()
    assert not task[0].done()
    assert model.batches == []
    await batcher.close()  # drains it
    assert await task[0] == 10


async def test_size_trigger_dispatches_a_full_batch_at_once() -> None:
    model = RecordingModel()
    batcher = make(model)
    results = await asyncio.gather(*spawn(batcher, 1, 2, 3, 4))
    assert results == [10, 20, 30, 40]
    assert model.batches == [[1, 2, 3, 4]]
    assert model.infos[0].reason == "full"
    await batcher.close()


async def test_overfull_queue_splits_into_max_size_batches_in_order() -> None:
    model = GatedModel()
    batcher = make(model)
    tasks = spawn(batcher, *range(10))
    await settle()
    model.gate.set()
    await settle()
    # Two full batches ran; the last two wait for a timeout that never comes...
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batcher.queue_size == 2
    # ...until close() drains them.
    await batcher.close()
    assert [t.result() for t in tasks] == [i * 10 for i in range(10)]
    assert model.batches[-1] == [8, 9]
    assert [info.reason for info in model.infos] == ["full", "full", "drain"]


async def test_timeout_is_measured_from_the_oldest_item() -> None:
    clock = FakeClock(100.0)
    model = RecordingModel()
    batcher = make(model, max_wait_s=0.010, clock=clock)
    first = spawn(batcher, 1)
    await settle()
    clock.now = 100.009
    second = spawn(batcher, 2)
    await settle()
    assert model.batches == []  # 9 ms after the oldest: not yet
    clock.now = 100.010  # 10 ms after the oldest, 1 ms after the newest
    results = await asyncio.wait_for(asyncio.gather(*first, *second), timeout=30)
    assert results == [10, 20]
    assert model.batches == [[1, 2]]
    info = model.infos[0]
    assert info.reason == "timeout"
    assert info.queue_waits_s == pytest.approx((0.010, 0.001))
    await batcher.close()


async def test_zero_wait_dispatches_at_once_and_queues_arrivals_while_busy() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=8, max_wait_s=0)
    first = spawn(batcher, 1)
    await model.started.wait()
    assert model.batches == [[1]]
    later = spawn(batcher, 2, 3, 4)  # the model is busy: these must wait together
    await settle()
    assert batcher.queue_size == 3
    model.gate.set()
    assert await asyncio.gather(*first, *later) == [10, 20, 30, 40]
    assert model.batches == [[1], [2, 3, 4]]
    await batcher.close()


async def test_at_most_one_batch_runs_by_default() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=2)
    tasks = spawn(batcher, 1, 2, 3, 4)
    await settle()
    assert batcher.running_batches == 1
    assert model.batches == [[1, 2]]
    model.gate.set()
    await asyncio.gather(*tasks)
    assert model.batches == [[1, 2], [3, 4]]
    await batcher.close()


async def test_max_concurrent_batches_allows_overlap() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=2, max_concurrent_batches=2)
    tasks = spawn(batcher, 1, 2, 3, 4)
    await settle()
    assert batcher.running_batches == 2
    assert model.batches == [[1, 2], [3, 4]]
    model.gate.set()
    await asyncio.gather(*tasks)
    await batcher.close()


async def test_submit_many_keeps_order_and_shares_batches() -> None:
    model = RecordingModel()
    batcher = make(model)
    assert await batcher.submit_many([5, 6, 7, 8]) == [50, 60, 70, 80]
    assert model.batches == [[5, 6, 7, 8]]
    await batcher.close()


async def test_a_one_item_caller_wakes_a_loop_round_before_a_gathered_one() -> None:
    # Its result is awaited directly: gather would add a round of its own, and under load
    # a round is every other ready callback.
    model = GatedModel()
    batcher = make(model, max_batch_size=3)
    one = asyncio.create_task(batcher.submit(1))
    many = asyncio.create_task(batcher.submit_many([2, 3]))
    await settle()
    assert model.batches == [[1, 2, 3]]
    model.gate.set()
    for _ in range(20):  # loop rounds, one at a time
        if one.done():
            break
        await asyncio.sleep(0)
    assert one.done()
    assert not many.done()
    assert (one.result(), await many) == (10, [20, 30])
    await batcher.close()


# --- cancellation, deadlines, admission -------------------------------------------------------


async def test_cancelled_caller_is_removed_before_the_forward_pass(
    observer: RecordingObserver,
) -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=2, observer=observer)
    busy = spawn(batcher, 1, 2)
    await model.started.wait()
    stays, leaves = spawn(batcher, 3), spawn(batcher, 4)
    await settle()
    leaves[0].cancel()
    await settle()
    assert batcher.queue_size == 1
    model.gate.set()
    await batcher.close()  # drains 3, which alone would wait an hour for company
    assert await asyncio.gather(*busy, *stays) == [10, 20, 30]
    with pytest.raises(asyncio.CancelledError):
        await leaves[0]
    assert model.batches == [[1, 2], [3]]  # 4 cost no compute
    assert observer.drops == {"cancelled": 1}


async def test_cancelled_during_forward_pass_is_not_completed_twice() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=2)
    tasks = spawn(batcher, 1, 2)
    await model.started.wait()
    tasks[0].cancel()
    model.gate.set()
    assert await tasks[1] == 20
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    await batcher.close()  # the autouse fixture fails on any InvalidStateError


async def test_deadline_that_passes_in_the_queue_costs_no_compute(
    observer: RecordingObserver,
) -> None:
    clock = FakeClock()
    model = GatedModel()
    batcher = make(model, max_batch_size=1, clock=clock, observer=observer)
    busy = spawn(batcher, 1)
    await model.started.wait()
    doomed = spawn(batcher, 2, timeout_s=5.0)
    await settle()
    clock.now = 6.0  # past its deadline, by the batcher's clock
    model.gate.set()
    assert await busy[0] == 10
    with pytest.raises(DeadlineExceededError):
        await doomed[0]
    await batcher.close()
    assert model.batches == [[1]]
    assert observer.drops == {"expired": 1}


async def test_caller_timeout_withdraws_the_item(observer: RecordingObserver) -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=1, observer=observer)
    busy = spawn(batcher, 1)
    await model.started.wait()
    with pytest.raises(DeadlineExceededError, match="deadline"):
        await batcher.submit(2, timeout_s=0)
    assert batcher.queue_size == 0
    model.gate.set()
    await busy[0]
    await batcher.close()
    assert model.batches == [[1]]
    assert observer.drops == {"expired": 1}


async def test_queue_full_rejects_at_once_and_all_or_nothing(observer: RecordingObserver) -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=1, max_queue_size=3, observer=observer)
    running = spawn(batcher, 0)
    await model.started.wait()
    queued = spawn(batcher, 1, 2)
    await settle()
    with pytest.raises(QueueFullError, match="2 of 3"):
        await batcher.submit_many([3, 4])  # one slot left: neither goes in
    assert batcher.queue_size == 2
    model.gate.set()
    assert await asyncio.gather(*running, *queued) == [0, 10, 20]
    await batcher.close()
    assert observer.drops == {"rejected": 2}


# --- failures ------------------------------------------------------------------------------


async def test_forward_error_fails_only_its_batch_and_hides_details() -> None:
    model = FailingModel(poison=3)
    batcher = make(model)
    results = await asyncio.gather(*spawn(batcher, 1, 2, 3, 4), return_exceptions=True)
    assert all(isinstance(r, InferenceError) for r in results)
    assert len({id(r) for r in results}) == 4  # one exception object per caller
    assert all("/secret/path" not in str(r) for r in results)
    assert isinstance(results[0].__cause__, RuntimeError)
    assert await asyncio.gather(*spawn(batcher, 5, 6, 7, 8)) == [50, 60, 70, 80]
    await batcher.close()


async def test_an_item_that_fails_alone_fails_only_its_caller(
    observer: RecordingObserver,
) -> None:
    async def model(items: Sequence[int], info: BatchInfo) -> list[int | ItemFailed]:
        return [ItemFailed(BadImageError(f"item {i}")) if i == 2 else i * 10 for i in items]

    batcher = make(model, observer=observer)
    results = await asyncio.gather(*spawn(batcher, 1, 2, 3, 4), return_exceptions=True)
    assert results[0] == 10
    assert results[2:] == [30, 40]
    assert isinstance(results[1], BadImageError)
    assert results[1].message == "item 2"
    await batcher.close()
    assert observer.done[0][1] is None  # the batch itself succeeded


async def test_wrong_result_count_fails_every_caller_in_the_batch(
    observer: RecordingObserver,
) -> None:
    batcher = make(MiscountingModel(), observer=observer)
    results = await asyncio.gather(*spawn(batcher, 1, 2, 3, 4), return_exceptions=True)
    assert [type(r) for r in results] == [InferenceError] * 4
    assert "returned 3 results for a batch of 4" in str(results[0])
    await batcher.close()
    assert isinstance(observer.done[0][1], InferenceError)


async def test_a_failed_item_withdraws_its_siblings_from_the_queue() -> None:
    model = FailingModel(poison=1)
    batcher = make(model, max_batch_size=1, max_wait_s=0)
    with pytest.raises(InferenceError):
        await batcher.submit_many([1, 2, 3])
    await batcher.close()
    assert model.batches == [[1]]  # 2 and 3 cost no compute once 1 failed


# --- lifecycle ------------------------------------------------------------------------------


async def test_close_drains_the_queue_and_waits_for_the_running_batch() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=2)
    tasks = spawn(batcher, 1, 2, 3)
    await model.started.wait()
    closing = asyncio.create_task(batcher.close())
    await settle()
    assert not closing.done()  # the running batch holds it
    with pytest.raises(BatcherClosedError):
        await batcher.submit(9)
    model.gate.set()
    await closing
    assert [t.result() for t in tasks] == [10, 20, 30]
    assert model.batches == [[1, 2], [3]]
    assert batcher.running_batches == 0


async def test_longest_running_is_measured_from_dispatch_by_the_batcher_clock() -> None:
    clock = FakeClock(100.0)
    model = GatedModel()
    batcher = make(model, max_batch_size=1, clock=clock, max_concurrent_batches=2)
    assert batcher.longest_running_s() == 0.0
    first = spawn(batcher, 1)
    await model.started.wait()
    clock.now = 103.0
    second = spawn(batcher, 2)
    await settle()
    assert batcher.running_batches == 2
    clock.now = 110.0
    assert batcher.longest_running_s() == 10.0  # the older of the two, not the newer
    model.gate.set()
    assert [await first[0], await second[0]] == [10, 20]
    assert batcher.longest_running_s() == 0.0
    await batcher.close()


async def test_abort_fails_queued_and_running_items_and_close_does_not_wait(
    observer: RecordingObserver,
) -> None:
    model = GatedModel()  # its gate stays shut: a forward pass that never returns
    batcher = make(model, max_batch_size=2, observer=observer)
    running = spawn(batcher, 1, 2)
    await model.started.wait()
    queued = spawn(batcher, 3, 4, 5)
    await settle()
    assert batcher.queue_size == 3
    batcher.abort(lambda: ModelStalledError("stalled"))
    errors = []
    for task in running + queued:
        with pytest.raises(ModelStalledError) as raised:
            await task
        errors.append(raised.value)
    assert len(set(map(id, errors))) == len(errors)  # one exception object per caller
    await batcher.close()  # returns although the gate is still shut
    assert batcher.queue_size == 0
    assert batcher.running_batches == 0
    assert observer.drops == {"aborted": 3}
    assert model.batches == [[1, 2]]  # the queued items never reached the model
    with pytest.raises(BatcherClosedError):
        await batcher.submit(9)


async def test_observer_sees_queue_sizes_dispatches_and_completions(
    observer: RecordingObserver,
) -> None:
    batcher = make(RecordingModel(), max_batch_size=2, observer=observer)
    await asyncio.gather(*spawn(batcher, 1, 2))
    await batcher.close()
    assert observer.queue_sizes == [1, 2, 0]
    assert [info.size for info in observer.dispatched] == [2]
    assert [(info.size, error) for info, error in observer.done] == [(2, None)]


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_batch_size", 0), ("max_wait_s", -1.0), ("max_queue_size", 0)],
)
def test_constructor_rejects_nonsense(option: str, value: float) -> None:
    options: dict[str, Any] = {"max_batch_size": 1, "max_wait_s": 0.0, "max_queue_size": 1}
    options[option] = value
    with pytest.raises(ValueError, match=option):
        Batcher[int, int](RecordingModel(), **options)


async def test_queue_full_carries_a_retry_after_from_the_measured_rate() -> None:
    clock = FakeClock()
    model = GatedModel()
    batcher = make(model, max_batch_size=2, max_queue_size=2, clock=clock)
    first = spawn(batcher, 1, 2)
    await model.started.wait()
    clock.now = 0.5  # the first batch of 2 took 0.5 s: 0.25 s per image
    model.gate.set()
    await asyncio.gather(*first)
    model.gate.clear()
    running = spawn(batcher, 3, 4)
    await settle()
    queued = spawn(batcher, 5, 6)
    await settle()
    with pytest.raises(QueueFullError) as caught:
        await batcher.submit(7)
    # 2 queued + 2 in the running batch, at 0.25 s each.
    assert caught.value.retry_after_s == pytest.approx(1.0)
    assert caught.value.headers == {"Retry-After": "1"}
    model.gate.set()
    await asyncio.gather(*running, *queued)
    await batcher.close()


async def test_retry_after_counts_concurrent_batches_as_running_side_by_side() -> None:
    clock = FakeClock()
    model = GatedModel()
    batcher = make(model, max_batch_size=2, max_queue_size=4, clock=clock, max_concurrent_batches=2)
    first = spawn(batcher, 1, 2)
    await model.started.wait()
    clock.now = 0.5  # a batch of 2 took 0.5 s: 0.25 s per image, per batch
    model.gate.set()
    await asyncio.gather(*first)
    model.gate.clear()
    running = spawn(batcher, 3, 4, 5, 6)  # two batches of 2, side by side
    await settle()
    assert batcher.running_batches == 2
    queued = spawn(batcher, 7, 8, 9, 10)
    await settle()
    assert batcher.queue_size == 4
    with pytest.raises(QueueFullError) as caught:
        await batcher.submit(11)
    # 4 running + 4 queued at 0.25 s each, served two batches at a time: 1 s, not 2 s.
    assert caught.value.retry_after_s == pytest.approx(1.0)
    model.gate.set()
    await asyncio.gather(*running, *queued)
    await batcher.close()


# --- a bounded drain ---------------------------------------------------------------------


async def test_close_with_a_timeout_fails_what_is_left_as_shutting_down(
    observer: RecordingObserver,
) -> None:
    model = GatedModel()  # its gate stays shut: a forward pass that never returns
    batcher = make(model, max_batch_size=2, observer=observer)
    running = spawn(batcher, 1, 2)
    await model.started.wait()
    queued = spawn(batcher, 3)
    await settle()
    assert await batcher.close(timeout_s=0) == 3  # returns although the gate is still shut
    for task in running + queued:
        with pytest.raises(BatcherClosedError, match="drain ran out of time"):
            await task
    assert batcher.running_batches == 0
    assert batcher.queue_size == 0
    assert observer.drops == {"aborted": 1}
    assert model.batches == [[1, 2]]


async def test_close_with_a_zero_timeout_and_nothing_left_fails_nothing() -> None:
    model = RecordingModel()
    batcher = make(model, max_batch_size=2)
    assert await asyncio.gather(*spawn(batcher, 1, 2)) == [10, 20]
    assert await batcher.close(timeout_s=0) == 0


# --- failures the batcher must survive or report ----------------------------------------


@pytest.mark.parametrize("event", ["on_queue_size", "on_dispatch", "on_batch_done", "on_drop"])
async def test_an_observer_that_raises_strands_no_caller(event: str) -> None:
    observer = RaisingObserver(event)
    model = RecordingModel()
    batcher = make(model, max_batch_size=2, max_queue_size=2, observer=observer)
    with structlog.testing.capture_logs() as logs:
        served = spawn(batcher, 1, 2)
        await settle()
        assert all(task.done() for task in served)  # no caller waits on a stranded future
        assert [task.result() for task in served] == [10, 20]
        with pytest.raises(QueueFullError):  # on_drop("rejected") raises first
            await batcher.submit_many([3, 4, 5])
        last = spawn(batcher, 6)  # a partial batch, sent by the drain
        await settle()
        await batcher.close()
    assert await last[0] == 60
    # The observer's bug is logged, not swallowed, and not the callers' problem.
    assert {"batcher_observer_failed"} == {
        log["event"] for log in logs if log.get("observer_event") == event
    }


async def test_a_dead_dispatcher_fails_its_queue_and_reports_once() -> None:
    clock = FakeClock()
    failures: list[BaseException] = []
    batcher = make(RecordingModel(), clock=clock, on_failure=failures.append)
    queued = spawn(batcher, 1)  # waits for a fuller batch
    await settle()
    clock.error = RuntimeError("a bug in the dispatcher's path")
    with batcher.expecting():
        pass  # wakes the dispatcher, which reads the clock and dies
    await settle()
    assert failures == [clock.error]
    with pytest.raises(BatcherClosedError, match="stopped unexpectedly"):
        await queued[0]
    assert batcher.closed
    clock.error = None
    with pytest.raises(BatcherClosedError):
        await batcher.submit(2)
    await batcher.close()  # does not re-raise the dispatcher's error


# --- withdrawal costs O(1) per item ---------------------------------------------------------


async def test_withdrawing_callers_one_by_one_costs_constant_work_each() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=1, max_queue_size=100_000)
    held = spawn(batcher, 0)
    await model.started.wait()  # the model is busy: everything after this stays queued
    queue = CountingDeque()
    batcher._queue = queue  # counts every entry any pass over the queue visits
    callers = 20_000
    tasks = spawn(batcher, *range(1, callers + 1))
    await settle(2)
    assert batcher.queue_size == callers
    withdrawn = 2_000
    for i, task in enumerate(tasks[:withdrawn]):
        task.cancel()  # a client that went away
        await asyncio.sleep(0)  # its handler sees the cancellation and withdraws its item
        assert batcher.queue_size == callers - i - 1  # exact after every withdrawal
        # Rebuilding the queue per withdrawal would visit ~20,000 entries each time.
        assert queue.visited <= 4 * (i + 1)
    model.gate.set()
    results = await asyncio.gather(*tasks[withdrawn:])
    assert results == [item * 10 for item in range(withdrawn + 1, callers + 1)]
    assert await held[0] == 0
    await batcher.close()


async def test_take_skips_withdrawn_items_and_sizes_stay_exact(
    observer: RecordingObserver,
) -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=4, observer=observer)
    held = spawn(batcher, 0, 0, 0, 0)
    await model.started.wait()
    tasks = spawn(batcher, 1, 2, 3, 4, 5, 6, 7, 8)
    await settle()
    for i in (0, 2, 3):  # items 1, 3 and 4 leave, the first of them the queue's head
        tasks[i].cancel()
    await settle()
    assert batcher.queue_size == 5
    assert observer.drops == {"cancelled": 3}
    model.gate.set()
    await batcher.close()  # the last, partial batch goes with the drain
    assert [tasks[i].result() for i in (1, 4, 5, 6, 7)] == [20, 50, 60, 70, 80]
    assert [task.result() for task in held] == [0, 0, 0, 0]
    # Full batches of live items only: the withdrawn ones took no place in a batch.
    assert model.batches == [[0, 0, 0, 0], [2, 5, 6, 7], [8]]
    assert batcher.queue_size == 0
