"""Seed-style server against the tuned one, in one run, on the same images and machine.

Also measures, in the same run, the pipeline bound (the model's best per-image time at the
tuned batch size plus one image's preprocessing) and checks the performance targets.

    python -m benchmarks.compare --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from batching_server.model import load_classifier
from batching_server.preprocess import Preprocessor
from batching_server.settings import settings_from_mapping
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

# What a first, naive server does: one image per forward pass, fp32, eager, NCHW.
SEED: dict[str, dict[str, Any]] = {
    "model": {"precision": "fp32", "channels_last": False, "compile": False},
    "batching": {"max_batch_size": 1, "max_wait_ms": 0.0},
}


def median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pipeline_costs(settings: dict[str, dict[str, Any]], jpegs: Sequence[bytes]) -> dict[str, float]:
    """Preprocessing per image (one thread) and the model's per-image time, in seconds."""
    # The model's best: every core on one forward pass, whatever threads the server uses.
    validated = settings_from_mapping(
        {**settings, "model": {**settings["model"], "weights": "random", "num_threads": 0}}
    )
    torch.set_num_threads(1)
    preprocessor = Preprocessor(
        weights="random",
        max_image_pixels=validated.limits.max_image_pixels,
        jpeg_draft=validated.preprocess.jpeg_draft,
        fast_resize=validated.preprocess.fast_resize,
    )
    for jpeg in jpegs:
        preprocessor(jpeg)
    preprocess_s = statistics.median(
        median_seconds(lambda j=jpeg: preprocessor(j), 20) for jpeg in jpegs
    )
    classifier = load_classifier(validated.model, batching=validated.batching)
    try:
        torch.set_num_threads(classifier.num_threads)
        size = validated.batching.max_batch_size
        # Real images, stacked into the model's layout as the server stacks them.
        images = [preprocessor(jpegs[i % len(jpegs)]) for i in range(size)]
        batch = torch.empty((size, *images[0].shape), memory_format=classifier.memory_format)
        full = torch.stack(images, out=batch)
        single = full[:1].clone()
        for batch in (full, single, full, single):  # compile both shapes, then warm caches
            classifier.forward(batch)
        batch_s = median_seconds(lambda: classifier.forward(full), 10)
        single_s = median_seconds(lambda: classifier.forward(single), 20)
    finally:
        classifier.close()
    return {
        "preprocess_ms": preprocess_s * 1000,
        "forward_b1_ms": single_s * 1000,
        "forward_per_image_ms": batch_s / size * 1000,
        "batch_size": size,
    }


async def serve_and_load(
    settings: dict[str, dict[str, Any]],
    bodies: Sequence[tuple[bytes, str]],
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    out = {}
    async with server_process(settings) as url:
        await measure(url, bodies, concurrency=4, duration_s=3)  # untimed warm-up
        for concurrency in args.concurrency:
            out[f"c{concurrency}"] = await measure(
                url, bodies, concurrency=concurrency, duration_s=args.duration
            )
            print(
                f"  c={concurrency}: {out[f'c{concurrency}']['throughput']:.1f} images/s",
                flush=True,
            )
    return out


def targets(
    seed: dict[str, Any], tuned: dict[str, Any], costs: dict[str, float], max_wait_ms: float
) -> list[dict[str, Any]]:
    high, low = tuned["c32"], tuned["c1"]
    bound = 1000 / (costs["forward_per_image_ms"] + costs["preprocess_ms"])
    latency_budget = costs["preprocess_ms"] + costs["forward_b1_ms"] + max_wait_ms + 3
    lag = sum(r["loop_lag_samples_over_10ms"] for r in tuned.values())
    checks = [
        (
            "throughput c=32 vs seed-style",
            high["throughput"] / seed["c32"]["throughput"],
            ">=",
            6.0,
        ),
        ("throughput c=32 vs pipeline bound", high["throughput"] / bound, ">=", 0.85),
        ("p50 at c=1 (ms)", low["p50_ms"], "<=", latency_budget),
        ("loop lag samples over 10 ms", float(lag), "<=", 0.0),
    ]
    return [
        {
            "target": name,
            "measured": value,
            "goal": f"{op} {goal:.2f}",
            "met": value >= goal if op == ">=" else value <= goal,
        }
        for name, value, op, goal in checks
    ] + [{"target": "pipeline bound (images/s)", "measured": bound, "goal": "", "met": ""}]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    jpegs = sample_jpegs()
    bodies = [multipart(jpeg) for jpeg in jpegs]
    tuned_settings = with_overrides(TUNED, args.set)
    # The bound is measured before and after the servers, and each cost is the lower of
    # the two: this CPU's speed drifts over minutes, and the bound must not be a slow
    # moment's (that would flatter the served/bound ratio).
    print("measuring the pipeline bound (model alone, preprocessing alone)...", flush=True)
    before = await asyncio.to_thread(pipeline_costs, tuned_settings, jpegs)
    print(f"  {before}", flush=True)
    print("seed-style server:", flush=True)
    seed = await serve_and_load(SEED, bodies, args)
    print("tuned server:", flush=True)
    tuned = await serve_and_load(tuned_settings, bodies, args)
    print("measuring the pipeline bound again...", flush=True)
    after = await asyncio.to_thread(pipeline_costs, tuned_settings, jpegs)
    print(f"  {after}", flush=True)
    costs = {key: min(before[key], after[key]) for key in before}
    checks = targets(seed, tuned, costs, tuned_settings["batching"]["max_wait_ms"])
    return {
        "machine": machine(),
        "settings": {"seed": SEED, "tuned": tuned_settings},
        "costs": costs,
        "costs_measured": {"before": before, "after": after},
        "seed": seed,
        "tuned": tuned,
        "targets": checks,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load point")
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "compare.json")
    args = parser.parse_args(argv)
    args.concurrency = [32, 1]
    payload = asyncio.run(run(args))
    rows = []
    for name in ("seed", "tuned"):
        for point, result in payload[name].items():
            rows.append({"server": name, "point": point, **result})
    print(table(rows, ("server", "point", "throughput", "p50_ms", "p99_ms", "mean_batch")))
    ratio = payload["tuned"]["c32"]["throughput"] / payload["seed"]["c32"]["throughput"]
    print(f"\ntuned / seed-style throughput at concurrency 32: {ratio:.2f}x\n")
    print(table(payload["targets"], ("target", "measured", "goal", "met")))
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
