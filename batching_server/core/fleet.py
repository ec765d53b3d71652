"""A worker's place in a fleet of worker processes: its index, and whether the fleet is ready."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FleetState", "WorkerRole"]


@dataclass(slots=True)
class FleetState:
    """What the supervisor last said about the whole fleet (it alone sees every worker)."""

    ready: bool = False
    reason: str = "waiting for the other workers to warm up"

    def update(self, *, ready: bool, reason: str) -> None:
        """Record the supervisor's latest word."""
        self.ready = ready
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRole:
    """One worker process among several: it answers for itself, the fleet answers ``/ready``."""

    index: int
    # Where every worker writes its metric values as they change, and any worker reads them
    # all to answer a scrape (observability.shared_metrics).
    metrics_dir: str
    fleet: FleetState = field(default_factory=FleetState)
