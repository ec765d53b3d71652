"""Splitting the machine between workers, and the supervisor's rule after a worker exits."""

from __future__ import annotations

from pathlib import Path

import pytest

from batching_server.core.readiness import ExitCode
from batching_server.workers.assignment import assign, visible_gpus, worker_count
from batching_server.workers.control import READY, fleet_message, parse_fleet_message
from batching_server.workers.supervisor import MAX_STARTUP_FAILURES, AfterExit, after_exit


@pytest.mark.parametrize(
    ("workers", "cores", "expected"),
    [
        (2, [0, 1], [(0,), (1,)]),
        (2, [3, 1, 2, 0], [(0, 1), (2, 3)]),
        (3, range(8), [(0, 1, 2), (3, 4, 5), (6, 7)]),
        (1, [4, 5], [(4, 5)]),
    ],
)
def test_each_worker_gets_a_disjoint_contiguous_share_of_every_core(
    workers: int, cores: list[int], expected: list[tuple[int, ...]]
) -> None:
    plan = assign(workers=workers, cores=list(cores), gpus=[])
    assert [a.cores for a in plan] == expected
    assert [a.index for a in plan] == list(range(workers))
    assert [a.threads for a in plan] == [len(c) for c in expected]
    assert all(a.gpu is None for a in plan)


def test_gpus_are_given_out_round_robin() -> None:
    plan = assign(workers=5, cores=range(16), gpus=["0", "1"])
    assert [a.gpu for a in plan] == ["0", "1", "0", "1", "0"]


def test_more_workers_than_cores_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"server.workers \(3\) exceeds the 2 cores.*2 or fewer"):
        assign(workers=3, cores=[0, 1], gpus=[])


@pytest.mark.parametrize(
    ("setting", "gpus", "expected"), [(0, 0, 1), (0, 4, 4), (2, 0, 2), (3, 8, 3), (1, 8, 1)]
)
def test_auto_is_one_worker_per_gpu_else_one(setting: int, gpus: int, expected: int) -> None:
    assert worker_count(setting, gpus=gpus) == expected


def test_visible_gpus_follow_cuda_visible_devices_then_the_driver(tmp_path: Path) -> None:
    driver = tmp_path / "gpus"
    driver.mkdir()
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (driver / bus).mkdir()
    assert visible_gpus({}, driver) == ["0", "1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,GPU-abc"}, driver) == ["2", "GPU-abc"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, driver) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,0"}, driver) == ["1"]
    assert visible_gpus({}, tmp_path / "no-driver") == []


@pytest.mark.parametrize(
    ("stopping", "was_ready", "code", "failures", "expected"),
    [
        (True, True, 0, 0, AfterExit.NOTHING),
        (True, False, 3, 1, AfterExit.NOTHING),
        (False, True, 137, 0, AfterExit.REPLACE),
        (False, True, ExitCode.MODEL_STALLED, 0, AfterExit.REPLACE),
        (False, False, 137, 1, AfterExit.RETRY),
        (False, False, ExitCode.STARTUP_FAILED, MAX_STARTUP_FAILURES - 1, AfterExit.RETRY),
        (False, False, 137, MAX_STARTUP_FAILURES, AfterExit.STOP_SERVER),
        (False, False, ExitCode.MODEL_LOAD_FAILED, 1, AfterExit.STOP_SERVER),
        (False, False, ExitCode.BAD_SETTINGS, 1, AfterExit.STOP_SERVER),
    ],
)
def test_after_a_worker_exits(
    stopping: bool, was_ready: bool, code: int, failures: int, expected: AfterExit
) -> None:
    action = after_exit(
        stopping=stopping, was_ready=was_ready, code=code, startup_failures=failures
    )
    assert action is expected


def test_fleet_messages_round_trip() -> None:
    assert parse_fleet_message(fleet_message(ready=True, reason="ready")) == (True, "ready")
    line = fleet_message(ready=False, reason="worker 1 is warming up\nagain")
    assert line.count(b"\n") == 1
    assert parse_fleet_message(line) == (False, "worker 1 is warming up again")
    assert parse_fleet_message(READY) is None
