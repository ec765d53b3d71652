"""HTTP load: real multipart JPEG uploads, closed-loop and open-loop (Poisson), over loopback.

Reports throughput, latency percentiles, errors, and from the server's own /metrics the batch
sizes it formed and how long its event loop was ever blocked.

    python -m benchmarks.load --concurrency 1,4,16,64 --rates 10,30 --duration 15
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks._common import (
    RESULTS,
    counter_delta,
    histogram_delta,
    histogram_mean,
    machine,
    multipart,
    percentile,
    require_loopback,
    sample_jpegs,
    scrape,
    started_server,
    table,
    thread_cpu_wait_s,
    write_json,
)

# The tuned configuration: the defaults in settings.toml plus the fast path that needs a
# warm-up compile (see the README for the measurements behind it).
TUNED: dict[str, dict[str, Any]] = {
    "model": {"precision": "auto", "channels_last": True, "compile": True},
    "batching": {"max_batch_size": 8, "max_wait_ms": 5.0, "batch_sizes": [1, 2, 4, 8]},
}
MAX_OPEN_LOOP_IN_FLIGHT = 2000  # an overloaded server must not make the client unbounded


class Recorder:
    """Latencies of successful requests and a count of every status."""

    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.statuses: Counter[str] = Counter()

    async def send(self, session: aiohttp.ClientSession, url: str, body: tuple[bytes, str]) -> None:
        started = time.perf_counter()
        try:
            async with session.post(
                f"{url}/predict", data=body[0], headers={"Content-Type": body[1]}
            ) as response:
                await response.read()
                status = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        self.statuses[status] += 1
        if status == "200":
            self.latencies_s.append(time.perf_counter() - started)


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    bodies: Sequence[tuple[bytes, str]],
    concurrency: int,
    duration_s: float,
    recorder: Recorder,
) -> None:
    """``concurrency`` clients, each sending its next upload as soon as the last returns."""
    deadline = time.perf_counter() + duration_s

    async def client(index: int) -> None:
        sent = index
        while time.perf_counter() < deadline:
            await recorder.send(session, url, bodies[sent % len(bodies)])
            sent += concurrency

    await asyncio.gather(*(client(i) for i in range(concurrency)))


async def open_loop(
    session: aiohttp.ClientSession,
    url: str,
    bodies: Sequence[tuple[bytes, str]],
    rate: float,
    duration_s: float,
    recorder: Recorder,
    seed: int = 1234,
) -> None:
    """Arrivals at ``rate`` per second with exponential gaps, whatever the server does."""
    rng = random.Random(seed)
    deadline = time.perf_counter() + duration_s
    in_flight: set[asyncio.Task[None]] = set()
    sent = 0
    next_at = time.perf_counter()
    while next_at < deadline:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if len(in_flight) < MAX_OPEN_LOOP_IN_FLIGHT:
            task = asyncio.create_task(recorder.send(session, url, bodies[sent % len(bodies)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        else:
            recorder.statuses["client_overflow"] += 1
        sent += 1
        next_at += rng.expovariate(rate)
    await asyncio.gather(*in_flight)


async def measure(
    url: str,
    bodies: Sequence[tuple[bytes, str]],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    duration_s: float,
    pid: int | None = None,
) -> dict[str, Any]:
    """One load point; returns client-side and server-side figures.

    With the server's ``pid`` (a server on this machine), also the share of the run its
    event loop spent waiting for a CPU.
    """
    require_loopback(url)
    recorder = Recorder()
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        before = await scrape(session, url)
        waited_before = thread_cpu_wait_s(pid) if pid else None
        started = time.perf_counter()
        if concurrency is not None:
            await closed_loop(session, url, bodies, concurrency, duration_s, recorder)
        else:
            assert rate is not None
            await open_loop(session, url, bodies, rate, duration_s, recorder)
        elapsed = time.perf_counter() - started
        waited_after = thread_cpu_wait_s(pid) if pid else None
        after = await scrape(session, url)
    result = summarise(recorder, elapsed, before, after, concurrency=concurrency, rate=rate)
    if waited_before is not None and waited_after is not None:
        result["loop_cpu_wait_share"] = (waited_after - waited_before) / elapsed
    return result


def _over_10ms(lag: dict[float, float]) -> int:
    """Samples in buckets above 10 ms (the buckets have a bound at 10 ms)."""
    return int(sum(count for bound, count in lag.items() if bound > 0.01))


def summarise(
    recorder: Recorder,
    elapsed: float,
    before: dict[Any, float],
    after: dict[Any, float],
    **point: Any,
) -> dict[str, Any]:
    latencies_ms = sorted(s * 1000 for s in recorder.latencies_s)
    batches = histogram_delta(before, after, "batch_size")
    lag = histogram_delta(before, after, "event_loop_lag_seconds")
    images = sum(size * count for size, count in batches.items() if size != float("inf"))
    n_batches = sum(batches.values())
    worst_lag = max((bound for bound, count in lag.items() if count), default=0.0)
    loop_cpu = counter_delta(before, after, "event_loop_cpu_seconds_total")
    nan = float("nan")
    return {
        **{k: v for k, v in point.items() if v is not None},
        "seconds": round(elapsed, 2),
        "ok": len(latencies_ms),
        "errors": {s: n for s, n in recorder.statuses.items() if s != "200"},
        "throughput": len(latencies_ms) / elapsed,
        "p50_ms": percentile(latencies_ms, 50),
        "p95_ms": percentile(latencies_ms, 95),
        "p99_ms": percentile(latencies_ms, 99),
        "batches": int(n_batches),
        "mean_batch": images / n_batches if n_batches else 0.0,
        "batch_size_counts": {
            int(k): int(v) for k, v in batches.items() if v and k != float("inf")
        },
        "loop_lag_samples_over_10ms": _over_10ms(lag),
        "loop_lag_worst_bucket_s": worst_lag,
        # The server's own view: a forward pass and a preprocessing under this load, to set
        # against their times alone (benchmarks.compare measures those next to its points).
        "server_forward_ms": 1000
        * histogram_mean(before, after, "model_inference_duration_seconds"),
        "server_preprocess_ms": 1000
        * histogram_mean(before, after, "image_preprocess_duration_seconds"),
        # The event loop thread's CPU: per answered image, and as a share of the wall time
        # (near 1: the loop itself is the limit).
        "loop_cpu_ms_per_image": 1000 * loop_cpu / len(latencies_ms) if latencies_ms else nan,
        "loop_busy": loop_cpu / elapsed,
    }


COLUMNS = (
    "point",
    "throughput",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "mean_batch",
    "errors",
    "lag>10ms",
    "cpu_wait",
    "loop_ms/img",
)


def row(result: dict[str, Any]) -> dict[str, Any]:
    point = f"c={result['concurrency']}" if "concurrency" in result else f"rate={result['rate']}/s"
    errors = sum(result["errors"].values())
    return {
        **result,
        "point": point,
        "errors": errors,
        "lag>10ms": result["loop_lag_samples_over_10ms"],
        "cpu_wait": result.get("loop_cpu_wait_share"),
        "loop_ms/img": result["loop_cpu_ms_per_image"],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = [multipart(jpeg) for jpeg in sample_jpegs()]
    points: list[dict[str, Any]] = [{"concurrency": c} for c in args.concurrency]
    points += [{"rate": r} for r in args.rates]
    results = []

    async def drive(url: str, pid: int | None = None) -> None:
        # One short untimed run first: connection set-up and first-touch costs.
        await measure(url, bodies, concurrency=2, duration_s=2)
        for point in points:
            if args.client_procs > 1:
                # Imported here: load_procs builds on this module's client loops.
                from benchmarks.load_procs import measure_procs

                result = await measure_procs(
                    url, bodies, procs=args.client_procs, duration_s=args.duration, pid=pid, **point
                )
            else:
                result = await measure(url, bodies, duration_s=args.duration, pid=pid, **point)
            results.append(result)
            print(f"  {row(result)['point']}: {result['throughput']:.1f} images/s", flush=True)

    if args.url:
        await drive(args.url)
    else:
        async with started_server(args.settings) as server:
            await drive(server.url, server.pid)
    return {"machine": machine(), "server": args.url or args.settings, "results": results}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server on loopback (default: start one)")
    parser.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64])
    parser.add_argument("--rates", type=_floats, default=[], help="open-loop arrivals per second")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per point")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="client processes sharing each point's load (benchmarks.load_procs)",
    )
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args(argv)
    args.settings = with_overrides(TUNED, args.set)
    return args


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable): server settings over the tuned ones."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a server setting (TOML value), e.g. --set batching.max_batch_size=16",
    )


def with_overrides(
    base: dict[str, dict[str, Any]], assignments: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """``base`` with ``section.key=value`` assignments applied (values parsed as TOML)."""
    settings = {section: dict(values) for section, values in base.items()}
    for assignment in assignments:
        key, _, raw = assignment.partition("=")
        section, _, name = key.partition(".")
        if not (section and name and raw):
            raise SystemExit(f"--set expects SECTION.KEY=VALUE, got {assignment!r}")
        settings.setdefault(section, {})[name] = tomllib.loads(f"v = {raw}")["v"]
    return settings


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    payload = asyncio.run(run(args))
    print(table([row(r) for r in payload["results"]], COLUMNS))
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
