"""The worker threads (decode pool, model): how many, torch's thread count, and priority."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import structlog
import torch

__all__ = [
    "BUILD_NICENESS",
    "DECODE_NICENESS",
    "MODEL_NICENESS",
    "ThreadPlan",
    "available_cores",
    "configure_worker_thread",
    "lower_thread_priority",
    "plan_threads",
    "run_in_passing_thread",
    "thread_niceness",
]

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Added to the decode and model threads' nice values (server.low_priority_workers), so the
# event loop gets a core as soon as a request or a result is ready rather than waiting behind
# a decode or a forward pass. Model threads go lowest: a batch that waits a little still
# serves all its images, while a late loop delays every request.
DECODE_NICENESS = 10
MODEL_NICENESS = 19
# Added to the nice value of the thread that compiles the model in the background (and of the
# compiler processes it starts): the eager model serves meanwhile, and every request it
# serves matters more than finishing the build sooner.
BUILD_NICENESS = 19


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


def configure_worker_thread(*, torch_threads: int, niceness: int) -> None:
    """Run first in each worker thread, before it does any work."""
    # With OpenMP the thread count is per calling thread: set it in the thread that runs.
    # torch sets a thread's count lazily, at its first parallel op, to the count whichever
    # thread set one last (a model thread, or another pool's worker): get_num_threads()
    # runs that lazy set-up now, so the count set next is the one this thread keeps.
    torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    lower_thread_priority(niceness)


def lower_thread_priority(niceness: int) -> None:
    """Add ``niceness`` to the calling thread's nice value (Linux; elsewhere nothing)."""
    if sys.platform != "linux" or not niceness:
        return
    # The threads and processes this one starts (the model's OpenMP workers, a compiler)
    # inherit its nice value; the event loop keeps its own. Raising niceness needs no
    # privilege.
    try:
        os.setpriority(os.PRIO_PROCESS, _thread_id(), min(19, thread_niceness() + niceness))
    except OSError as exc:
        log.warning("worker_niceness_not_applied", niceness=niceness, error=str(exc))


async def run_in_passing_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``asyncio.to_thread``, in a thread of its own that ends with the call.

    For torch work outside the model threads (loading, compiling). OpenMP (libgomp) keeps a
    team of worker threads for every thread that ever ran a parallel region, for as long as
    that thread lives; once a process's OpenMP threads outnumber its cores, every team's
    workers stop spinning at barriers and sleep, and a forward pass crosses hundreds of
    barriers, each then a wake-up. A thread that ends takes its team with it, leaving the
    model threads' teams the only ones.
    """
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="passing")
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    try:
        return await loop.run_in_executor(executor, call)
    finally:
        executor.shutdown(wait=False)  # its thread ends once the call returns
