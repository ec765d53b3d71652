"""The serving core: the dynamic batcher, readiness, the stall watchdog and the error types.

Plain asyncio and the standard library only: no aiohttp, no torch. Every layer above builds
on these.
"""

from .batcher import Batcher, BatchInfo, BatchPlan, plan_batch
from .errors import ServiceError
from .readiness import ExitCode, Readiness
from .shapes import padded_size, warmup_sizes
from .watchdog import StallWatchdog

__all__ = [
    "BatchInfo",
    "BatchPlan",
    "Batcher",
    "ExitCode",
    "Readiness",
    "ServiceError",
    "StallWatchdog",
    "padded_size",
    "plan_batch",
    "warmup_sizes",
]
