"""Two servers already running on loopback, one request at a time, in alternating rounds:
client-side p50 and the server's own mean forward pass, round by round.

For changes whose effect is smaller than this machine's drift: start the old code and the
new side by side (an idle server costs the other nothing), then

    python -m benchmarks.ab --urls http://127.0.0.1:8081,http://127.0.0.1:8080 --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks._common import (
    RESULTS,
    histogram_mean,
    machine,
    multipart,
    require_loopback,
    sample_jpegs,
    scrape,
    write_json,
)

__all__ = ["main"]

FORWARD = "model_inference_duration_seconds"


async def _round(
    session: aiohttp.ClientSession, url: str, body: tuple[bytes, str], seconds: float
) -> dict[str, float]:
    data, content_type = body
    headers = {"Content-Type": content_type}
    for _ in range(3):  # a fresh connection and warm caches before timing
        async with session.post(f"{url}/predict", data=data, headers=headers) as response:
            await response.read()
    before = await scrape(session, url)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        async with session.post(f"{url}/predict", data=data, headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{url}: {response.status}")
        latencies.append((time.perf_counter() - started) * 1000)
    after = await scrape(session, url)
    return {
        "p50_ms": statistics.median(latencies),
        "forward_ms": histogram_mean(before, after, FORWARD) * 1000,
        "requests": len(latencies),
    }


async def run(urls: Sequence[str], rounds: int, seconds: float) -> dict[str, Any]:
    body = multipart(sample_jpegs()[0])
    per_url: dict[str, list[dict[str, float]]] = {url: [] for url in urls}
    async with aiohttp.ClientSession() as session:
        for number in range(rounds):
            order = list(urls) if number % 2 == 0 else list(reversed(urls))
            for url in order:
                result = await _round(session, url, body, seconds)
                per_url[url].append(result)
                print(
                    f"round {number + 1} {url}: p50 {result['p50_ms']:.1f} ms, "
                    f"forward {result['forward_ms']:.1f} ms",
                    flush=True,
                )
    return {
        "rounds": rounds,
        "seconds": seconds,
        "servers": [
            {
                "url": url,
                "p50_ms": statistics.median(r["p50_ms"] for r in results),
                "forward_ms": statistics.median(r["forward_ms"] for r in results),
                "rounds": results,
            }
            for url, results in per_url.items()
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--urls", required=True, help="comma-separated: A,B")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0, help="per round and server")
    parser.add_argument("--out", type=Path, default=RESULTS / "ab.json")
    args = parser.parse_args(argv)
    urls = [u.strip().rstrip("/") for u in args.urls.split(",") if u.strip()]
    for url in urls:
        require_loopback(url)
    result = asyncio.run(run(urls, args.rounds, args.seconds))
    for server in result["servers"]:
        print(
            f"{server['url']}: median p50 {server['p50_ms']:.1f} ms, "
            f"median forward {server['forward_ms']:.1f} ms"
        )
    write_json(args.out, {"machine": machine(), **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
