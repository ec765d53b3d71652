"""How many workers, and each one's share of the machine: a disjoint set of cores, a GPU."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkerAssignment", "assign", "visible_gpus", "worker_count"]

# One entry per GPU the NVIDIA driver has found; read without importing torch or CUDA, so
# the supervisor stays light and creates no CUDA context of its own.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerAssignment:
    """One worker's share: it pins itself to ``cores`` and sees only ``gpu`` (if any)."""

    index: int
    cores: tuple[int, ...]
    gpu: str | None  # a CUDA_VISIBLE_DEVICES entry: an index or a GPU's UUID

    @property
    def threads(self) -> int:
        """Torch and decode threads the worker's auto settings resolve to: one per core."""
        return len(self.cores)


def visible_gpus(
    environ: Mapping[str, str] | None = None, driver_dir: Path = NVIDIA_GPUS
) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else the driver's list."""
    environ = os.environ if environ is None else environ
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        entries = [entry.strip() for entry in given.split(",")]
        # CUDA stops at the first invalid entry ("-1" is the usual way to hide every GPU).
        visible = []
        for entry in entries:
            if not entry or entry.startswith("-"):
                break
            visible.append(entry)
        return visible
    try:
        return [str(i) for i in range(len(list(driver_dir.iterdir())))]
    except OSError:  # no NVIDIA driver: a CPU-only machine
        return []


def worker_count(setting: int, *, gpus: int | None = None) -> int:
    """``server.workers`` resolved: 0 (auto) is one per GPU, or 1 without a GPU.

    On a CPU-only machine one process already spreads decodes and forward passes over every
    core; extra processes there are the operator's measured choice, not a default.
    """
    if setting:
        return setting
    gpus = len(visible_gpus()) if gpus is None else gpus
    return max(1, gpus)


def assign(*, workers: int, cores: Sequence[int], gpus: Sequence[str]) -> list[WorkerAssignment]:
    """Split ``cores`` into ``workers`` contiguous, disjoint sets; give out GPUs round-robin.

    Contiguous sets keep a worker's threads close (shared caches); sizes differ by one at
    most. Raises ValueError, naming the fix, when there are fewer cores than workers.
    """
    if workers < 1:
        raise ValueError(f"server.workers must be at least 1 here, got {workers}")
    ordered = sorted(cores)
    if workers > len(ordered):
        raise ValueError(
            f"server.workers ({workers}) exceeds the {len(ordered)} cores this server may use "
            f"(its CPU affinity): set server.workers to {len(ordered)} or fewer"
        )
    base, extra = divmod(len(ordered), workers)
    plan = []
    start = 0
    for index in range(workers):
        size = base + (1 if index < extra else 0)
        plan.append(
            WorkerAssignment(
                index=index,
                cores=tuple(ordered[start : start + size]),
                gpu=gpus[index % len(gpus)] if gpus else None,
            )
        )
        start += size
    return plan
