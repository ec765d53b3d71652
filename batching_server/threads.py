"""Set-up of the worker threads (decode pool, model): torch's thread count and priority."""

from __future__ import annotations

import os
import sys
import threading

import structlog
import torch

__all__ = ["configure_worker_thread", "thread_niceness"]

log = structlog.get_logger("batching_server.threads")


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
    torch.set_num_threads(torch_threads)
    if not niceness or sys.platform != "linux":
        return
    # Lower this thread's priority; the threads it starts (the model's OpenMP workers)
    # inherit it. The event loop keeps its own, so on a busy machine it gets a core as
    # soon as a request or a result is ready, rather than waiting behind a forward pass.
    # Raising niceness needs no privilege.
    try:
        os.setpriority(os.PRIO_PROCESS, _thread_id(), min(19, thread_niceness() + niceness))
    except OSError as exc:
        log.warning("worker_niceness_not_applied", niceness=niceness, error=str(exc))
