"""Many client processes for benchmarks.load (``--client-procs N``): one Python client tops
out at a few thousand requests per second, short of what several server workers can serve.

Each process runs load.py's own closed or open loop on its share of the load (concurrency
split as evenly as it goes, the arrival rate divided, each with its own random seed), all
start at one moment, and their latencies and statuses are merged before the summary, so
percentiles come from every sample, not from averaged percentiles.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from typing import Any

import aiohttp

from benchmarks._common import require_loopback, sample_jpegs, scrape, thread_cpu_wait_s
from benchmarks.load import ClientSpec, Recorder, closed_loop, open_loop, summarise

__all__ = ["measure_procs", "shares"]

# Time for every process to import and build its bodies before the common start.
START_DELAY_S = 5.0


def shares(total: int, procs: int) -> list[int]:
    """``total`` clients split over ``procs`` processes, sizes differing by one at most."""
    base, extra = divmod(total, procs)
    return [base + (1 if i < extra else 0) for i in range(procs)]


async def _client(
    url: str,
    spec: ClientSpec,
    concurrency: int | None,
    rate: float | None,
    duration_s: float,
    seed: int,
    start_at: float,
) -> Recorder:
    client = spec.make()
    bodies = [client.prepare(jpeg) for jpeg in sample_jpegs()]
    recorder = Recorder(client)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        # time.monotonic is one clock for every process of the machine (CLOCK_MONOTONIC).
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        if concurrency is not None:
            await closed_loop(session, url, bodies, concurrency, duration_s, recorder)
        else:
            assert rate is not None
            await open_loop(session, url, bodies, rate, duration_s, recorder, seed=seed)
    return recorder


def _run_client(
    url: str,
    spec: ClientSpec,
    concurrency: int | None,
    rate: float | None,
    duration_s: float,
    seed: int,
    start_at: float,
) -> tuple[list[float], dict[str, int]]:
    recorder = asyncio.run(_client(url, spec, concurrency, rate, duration_s, seed, start_at))
    return recorder.latencies_s, dict(recorder.statuses)


async def measure_procs(
    url: str,
    spec: ClientSpec,
    *,
    procs: int,
    concurrency: int | None = None,
    rate: float | None = None,
    duration_s: float,
    pid: int | None = None,
) -> dict[str, Any]:
    """One load point offered by ``procs`` client processes; the same summary as measure()."""
    require_loopback(url)
    if concurrency is not None:
        loads: list[tuple[int | None, float | None]] = [
            (share, None) for share in shares(concurrency, procs) if share
        ]
    else:
        assert rate is not None
        loads = [(None, rate / procs)] * procs
    async with aiohttp.ClientSession() as session:
        before = await scrape(session, url)
    waited_before = thread_cpu_wait_s(pid) if pid else None
    start_at = time.monotonic() + START_DELAY_S
    loop = asyncio.get_running_loop()
    # Spawned, not forked: a fresh interpreter each, with no event loop state to inherit.
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(loads)) as pool:
        pending = [
            pool.apply_async(_run_client, (url, spec, c, r, duration_s, 1234 + i, start_at))
            for i, (c, r) in enumerate(loads)
        ]
        parts = [await loop.run_in_executor(None, p.get) for p in pending]
    elapsed = time.monotonic() - start_at
    waited_after = thread_cpu_wait_s(pid) if pid else None
    async with aiohttp.ClientSession() as session:
        after = await scrape(session, url)
    merged = Recorder()
    for latencies_s, statuses in parts:
        merged.latencies_s.extend(latencies_s)
        merged.statuses.update(Counter(statuses))
    result = summarise(
        merged,
        elapsed,
        before,
        after,
        protocol=spec.protocol,
        concurrency=concurrency,
        rate=rate,
        client_procs=procs,
    )
    if waited_before is not None and waited_after is not None:
        result["loop_cpu_wait_share"] = (waited_after - waited_before) / elapsed
    return result
