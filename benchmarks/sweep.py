"""Tune the batcher: run the load benchmark across max_batch_size x max_wait_ms.

Prints and plots throughput against p99 latency, then recommends a ``[batching]`` block: the
highest throughput whose p99 stays within ``--p99-slo-ms``.

    python -m benchmarks.sweep --batch-sizes 1,4,8,16 --waits 0,5,20 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    RESULTS,
    machine,
    multipart,
    sample_jpegs,
    server_process,
    table,
    write_json,
)
from benchmarks.load import TUNED, add_set_option, measure, with_overrides

POWERS_OF_TWO = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def allowed_shapes(max_batch_size: int) -> list[int]:
    """Powers of two up to the first that holds ``max_batch_size``: few shapes to compile."""
    shapes = [p for p in POWERS_OF_TWO if p < max_batch_size]
    return [*shapes, next(p for p in POWERS_OF_TWO if p >= max_batch_size)]


async def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    bodies = [multipart(jpeg) for jpeg in sample_jpegs()]
    results = []
    for size in args.batch_sizes:
        for wait in args.waits:
            settings = with_overrides(TUNED, args.set)
            settings["batching"] |= {
                "max_batch_size": size,
                "max_wait_ms": wait,
                "batch_sizes": allowed_shapes(size),
                "max_queue_size": max(64, 4 * args.concurrency),
            }
            async with server_process(settings) as url:
                await measure(url, bodies, concurrency=2, duration_s=2)  # untimed warm-up
                result = await measure(
                    url, bodies, concurrency=args.concurrency, duration_s=args.duration
                )
            result |= {"max_batch_size": size, "max_wait_ms": wait}
            results.append(result)
            print(
                f"  max_batch_size={size} max_wait_ms={wait}: "
                f"{result['throughput']:.1f} images/s, p99 {result['p99_ms']:.0f} ms",
                flush=True,
            )
    return results


def recommend(results: Sequence[dict[str, Any]], p99_slo_ms: float) -> dict[str, Any] | None:
    """The best throughput within the latency objective, with no errors."""
    eligible = [r for r in results if r["p99_ms"] <= p99_slo_ms and not r["errors"]]
    return max(eligible, key=lambda r: r["throughput"], default=None)


def plot(results: Sequence[dict[str, Any]], path: Path, best: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for wait in sorted({r["max_wait_ms"] for r in results}):
        points = sorted((r for r in results if r["max_wait_ms"] == wait), key=lambda r: r["p99_ms"])
        axes.plot(
            [r["p99_ms"] for r in points],
            [r["throughput"] for r in points],
            marker="o",
            label=f"max_wait_ms={wait:g}",
        )
        for r in points:
            axes.annotate(f"b{r['max_batch_size']}", (r["p99_ms"], r["throughput"]), fontsize=8)
    if best is not None:
        axes.scatter(
            [best["p99_ms"]], [best["throughput"]], s=160, facecolors="none", edgecolors="k"
        )
    axes.set_xlabel("p99 latency (ms)")
    axes.set_ylabel("throughput (images/s)")
    axes.set_title("batching sweep: throughput against p99 (bN = max_batch_size)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def batching_block(best: dict[str, Any]) -> str:
    return "\n".join(
        [
            "[batching]",
            f"max_batch_size = {best['max_batch_size']}",
            f"max_wait_ms = {float(best['max_wait_ms'])}",
            f"batch_sizes = {allowed_shapes(best['max_batch_size'])}",
        ]
    )


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 4, 8, 16])
    parser.add_argument("--waits", type=_floats, default=[0.0, 5.0, 20.0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per point")
    parser.add_argument("--p99-slo-ms", type=float, default=1000.0)
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "sweep.png")
    args = parser.parse_args(argv)

    results = asyncio.run(sweep(args))
    columns = ("max_batch_size", "max_wait_ms", "throughput", "p50_ms", "p99_ms", "mean_batch")
    print(table(results, columns))
    best = recommend(results, args.p99_slo_ms)
    plot(results, args.plot, best)
    write_json(
        args.out,
        {"machine": machine(), "concurrency": args.concurrency, "results": results, "best": best},
    )
    if best is None:
        print(f"no configuration kept p99 under {args.p99_slo_ms} ms without errors")
        return 1
    print(f"\nrecommended for concurrency {args.concurrency}, p99 <= {args.p99_slo_ms:g} ms:\n")
    print(batching_block(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
