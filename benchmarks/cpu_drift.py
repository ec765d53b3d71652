"""How steady is this machine? The same work, timed on each CPU in turn, round after round.

Run it before trusting any other figure: a CPU shared with other tenants changes speed from
one second to the next, and every ratio between two runs inherits that.

    python -m benchmarks.cpu_drift --rounds 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks._common import RESULTS, machine, table, write_json

SIZE = 384  # a float32 matrix product of this size takes a few ms on one core


def timed_ms(work: torch.Tensor, repeats: int) -> float:
    """The fastest of ``repeats`` runs of the fixed work, in ms."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(10):
            work @ work
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between rounds")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_drift.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    cpus = sorted(os.sched_getaffinity(0))
    rows = []
    times: dict[int, list[float]] = {cpu: [] for cpu in cpus}
    try:
        for round_ in range(args.rounds):
            row: dict[str, object] = {"round": round_, "time": time.strftime("%H:%M:%S")}
            for cpu in cpus:
                os.sched_setaffinity(0, {cpu})
                times[cpu].append(timed_ms(work, 3))
                row[f"cpu{cpu}_ms"] = times[cpu][-1]
            rows.append(row)
            time.sleep(args.pause)  # spread the rounds over time: drift is the measurement
    finally:
        os.sched_setaffinity(0, cpus)
    columns = ("round", "time", *(f"cpu{cpu}_ms" for cpu in cpus))
    print(table(rows, columns))
    summary = [
        {
            "cpu": cpu,
            "fastest_ms": min(values),
            "median_ms": statistics.median(values),
            "slowest_ms": max(values),
            "slowest/fastest": max(values) / min(values),
        }
        for cpu, values in times.items()
    ]
    print()
    print(table(summary, ("cpu", "fastest_ms", "median_ms", "slowest_ms", "slowest/fastest")))
    write_json(args.out, {"machine": machine(), "rounds": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
