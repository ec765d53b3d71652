"""The worker threads (decode pool, model): how many, torch's thread count, and priority.

Also what the scheduler did to a thread: how long it waited for a CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog
import torch

__all__ = [
    "ThreadPlan",
    "available_cores",
    "configure_worker_thread",
    "plan_threads",
    "run_queue_clock",
    "thread_niceness",
]

log = structlog.get_logger("batching_server.threads")


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    """How forward passes share the cores."""

    concurrent_batches: int  # forward passes in flight, each on its own model thread
    threads: int  # torch threads of each forward pass
    solo_threads: int  # of a one-image batch that starts while no other pass runs


def plan_threads(
    *, cores: int, device_type: str, concurrent_batches: int, num_threads: int
) -> ThreadPlan:
    """Resolve ``max_concurrent_batches`` and ``num_threads`` (0 means auto for both).

    On a CPU, auto runs two forward passes at once, each on half the cores: one pass's
    OpenMP team waits at every barrier for whichever of its threads was pre-empted (by a
    decode, the event loop, or the hypervisor), leaving cores idle with work queued, while
    two passes only share the cores. A lone one-image batch, the latency an idle server's
    client sees, still gets every core. A GPU runs one pass at a time.
    """
    if not concurrent_batches:
        concurrent_batches = 1 if device_type == "cuda" or cores < 2 else 2
    if num_threads:  # set by hand: every pass gets exactly that
        return ThreadPlan(concurrent_batches, num_threads, num_threads)
    threads = max(1, cores // concurrent_batches)
    return ThreadPlan(concurrent_batches, threads, max(threads, cores))


def thread_niceness() -> int:
    """The calling thread's nice value (its process's where threads have none)."""
    return os.getpriority(os.PRIO_PROCESS, _thread_id())


def _thread_id() -> int:
    # Linux keeps a nice value per thread, addressed by its thread id; elsewhere the
    # process's is the only one.
    return threading.get_native_id() if sys.platform == "linux" else 0


def configure_worker_thread(*, torch_threads: int, niceness: int, idle: bool = False) -> None:
    """Run first in each worker thread, before it does any work.

    ``idle`` puts the thread under ``SCHED_IDLE`` (Linux); ``niceness`` applies otherwise,
    or where that fails.
    """
    # With OpenMP the thread count is per calling thread: set it in the thread that runs.
    torch.set_num_threads(torch_threads)
    if sys.platform != "linux":
        return
    # The threads this one starts (the model's OpenMP workers) inherit its policy and nice
    # value. The event loop keeps its own, so on a busy machine it gets a core as soon as a
    # request or a result is ready, rather than waiting behind a forward pass.
    if idle and _run_when_idle():
        return
    if not niceness:
        return
    # Raising niceness needs no privilege.
    try:
        os.setpriority(os.PRIO_PROCESS, _thread_id(), min(19, thread_niceness() + niceness))
    except OSError as exc:
        log.warning("worker_niceness_not_applied", niceness=niceness, error=str(exc))


def _run_when_idle() -> bool:
    # A nice value is only a weight. Linux's EEVDF scheduler makes a woken thread wait until
    # the others have caught up on the CPU time it got ahead of them, and the event loop
    # runs in bursts: traced with perf sched, it waited 9 ms behind two nice-10 decode
    # threads' 4 ms ticks. A normal thread that wakes pre-empts a SCHED_IDLE one at once.
    # Needs no privilege.
    try:
        os.sched_setscheduler(_thread_id(), os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        log.warning("sched_idle_not_applied", error=str(exc))
        return False
    return True


@contextlib.contextmanager
def run_queue_clock() -> Iterator[Callable[[], float] | None]:
    """Seconds the calling thread has waited, runnable, for a CPU so far (Linux).

    Yields a function that reads it, or None where the kernel does not say.
    """
    try:
        # Opened once and re-read in place: /proc/thread-self names the opening thread.
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        yield None
        return

    def waited_s() -> float:
        # "<ns on the CPU> <ns waiting on a run queue> <time slices>"
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9

    try:
        yield waited_s
    finally:
        os.close(fd)
