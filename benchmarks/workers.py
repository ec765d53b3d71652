"""``server.workers`` = 1 against 2 (or any list), in one run, alternating, on the same machine.

Each round starts each setting's server in turn (alone on the machine: the other is stopped),
offers every load point from several client processes (``--client-procs``, so the client is
not the limit), and stops it; the order of the settings rotates from round to round, so a
drift of the machine's speed during the run falls on both. Throughput is over all rounds;
latencies are the median round's. The servers run the product's defaults (eager, see BASE)
with ``--set`` overrides.

    python -m benchmarks.workers --workers 1,2 --concurrency 16,64 --duration 20 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine, started_server, table, write_json
from benchmarks.load import ClientSpec, _ints, add_set_option, with_overrides
from benchmarks.load_procs import measure_procs

__all__ = ["main", "run", "summary"]


def rotated(items: Sequence[int], round_index: int) -> list[int]:
    """``items`` started at a different one each round, so none always goes first."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


# Eager: with model.compile = auto, a server might still be compiling in the background while
# it is measured, and compiling changes each process's speed, not how processes share a machine.
BASE: dict[str, dict[str, Any]] = {"model": {"compile": "false"}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = with_overrides(BASE, args.set)
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for index in range(args.rounds):
        for workers in rotated(args.workers, index):
            settings = {**base, "server": {**base.get("server", {}), "workers": workers}}
            print(f"round {index + 1}/{args.rounds}: workers = {workers}", flush=True)
            async with started_server(settings) as server:
                # Untimed: connections, first-touch costs, and every worker reached.
                await measure_procs(
                    server.url,
                    ClientSpec("predict"),
                    procs=args.client_procs,
                    concurrency=4 * workers,
                    duration_s=3,
                )
                for concurrency in args.concurrency:
                    result = await measure_procs(
                        server.url,
                        ClientSpec("predict"),
                        procs=args.client_procs,
                        concurrency=concurrency,
                        duration_s=args.duration,
                    )
                    rounds.setdefault(f"w{workers}", {}).setdefault(f"c{concurrency}", []).append(
                        result
                    )
                    print(
                        f"  c={concurrency}: {result['throughput']:.1f} images/s, "
                        f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms",
                        flush=True,
                    )
    return {
        "machine": machine(),
        "settings": base,
        "client_procs": args.client_procs,
        "rounds": rounds,
        "summary": summary(rounds),
    }


def summary(rounds: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per setting and point: throughput over all rounds, the median round's latency."""
    rows = []
    for setting, points in rounds.items():
        for point, results in points.items():
            seconds = sum(r["seconds"] for r in results)
            rows.append(
                {
                    "workers": int(setting.removeprefix("w")),
                    "point": point,
                    "throughput": sum(r["ok"] for r in results) / seconds,
                    "p50_ms": statistics.median(r["p50_ms"] for r in results),
                    "p99_ms": statistics.median(r["p99_ms"] for r in results),
                    "mean_batch": statistics.median(r["mean_batch"] for r in results),
                    "errors": sum(sum(r["errors"].values()) for r in results),
                    "rounds": len(results),
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=_ints, default=[1, 2], help="settings to compare")
    parser.add_argument("--concurrency", type=_ints, default=[16, 64], help="load points")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per point")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per setting")
    parser.add_argument(
        "--client-procs", type=int, default=2, help="client processes offering the load"
    )
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "workers.json")
    args = parser.parse_args(argv)
    payload = asyncio.run(run(args))
    columns = ("workers", "point", "throughput", "p50_ms", "p99_ms", "mean_batch", "errors")
    print(table(payload["summary"], columns))
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
