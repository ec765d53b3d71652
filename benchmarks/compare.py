"""Seed-style server against the tuned one, in one run, on the same images and machine.

Both servers run at once and take turns in short rounds of each load point; between them the
benchmark measures the pipeline bound (the model's best per-image time at the tuned batch size
plus one image's preprocessing), and it checks the performance targets round by round.

    python -m benchmarks.compare --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from batching_server.models import RESNET50, load_runner
from batching_server.models.threads import available_cores
from batching_server.preprocess import Preprocessor
from batching_server.settings import settings_from_mapping
from benchmarks._common import (
    RESULTS,
    Server,
    machine,
    multipart,
    sample_jpegs,
    started_server,
    table,
    write_json,
)
from benchmarks.load import TUNED, add_set_option, measure, with_overrides

# What a first, naive server does: one image per forward pass, fp32, eager, NCHW, torch's
# default threads (every core on the one pass in flight).
SEED: dict[str, dict[str, Any]] = {
    "model": {"precision": "fp32", "channels_last": False, "compile": False, "num_threads": 0},
    "batching": {"max_batch_size": 1, "max_wait_ms": 0.0, "max_concurrent_batches": 1},
}


def median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class PipelineBound:
    """The pipeline bound's costs: preprocessing per image (one thread) and the model's
    best per-image time on these cores, measured as often as asked with one loaded model."""

    def __init__(self, settings: dict[str, dict[str, Any]], jpegs: Sequence[bytes]) -> None:
        validated = settings_from_mapping(
            {**settings, "model": {**settings["model"], "weights": "random"}}
        )
        self.jpegs = jpegs
        self.preprocessor = Preprocessor(
            transform=RESNET50.transform("random"),
            max_image_pixels=validated.limits.max_image_pixels,
            jpeg_draft=validated.preprocess.jpeg_draft,
            fast_resize=validated.preprocess.fast_resize,
        )
        self.classifier = load_runner(validated.model, batching=validated.batching)
        self.size = validated.batching.max_batch_size
        self.cores = available_cores()
        # Real images, stacked as the server stacks them.
        images = [self.preprocessor(jpegs[i % len(jpegs)]) for i in range(self.size)]
        self.full = self.classifier.forward_pass.stack(images)
        self.single = self.full[:1].clone()
        # Set up as the server's model threads are, on the per-pass thread count.
        self.passes = ThreadPoolExecutor(
            self.classifier.threads.concurrent_batches,
            initializer=torch.set_num_threads,
            initargs=(self.classifier.threads.threads,),
        )
        self.measure()  # compiles every shape and thread count it times

    def _forward(self, pixels: torch.Tensor, threads: int, repeats: int) -> float:
        return median_seconds(lambda: self.classifier.forward(pixels, threads=threads), repeats)

    def _side_by_side(self, repeats: int) -> float:
        """Seconds per batch with the server's passes in flight at once, on its threads."""
        plan = self.classifier.threads

        def one_pass() -> None:
            for _ in range(repeats):
                self.classifier.forward(self.full, threads=plan.threads)

        started = time.perf_counter()
        for done in [self.passes.submit(one_pass) for _ in range(plan.concurrent_batches)]:
            done.result()
        return (time.perf_counter() - started) / (repeats * plan.concurrent_batches)

    def measure(self) -> dict[str, float]:
        """The costs now, in ms (this CPU's speed drifts: measure next to what they bound).

        The model's best is the faster of one pass on every core and the server's layout
        (``max_concurrent_batches`` passes side by side), whichever the server uses.
        """
        torch.set_num_threads(1)
        for jpeg in self.jpegs:
            self.preprocessor(jpeg)
        preprocess_s = statistics.median(
            median_seconds(lambda j=jpeg: self.preprocessor(j), 20) for jpeg in self.jpegs
        )
        plan = self.classifier.threads
        for threads in {self.cores, plan.threads}:  # warm caches
            self.classifier.forward(self.full, threads=threads)
            self.classifier.forward(self.single, threads=threads)
        one_pass_s = self._forward(self.full, self.cores, 10)
        side_by_side_s = self._side_by_side(5) if plan.concurrent_batches > 1 else one_pass_s
        single_s = min(
            self._forward(self.single, threads, 20) for threads in {self.cores, plan.threads}
        )
        return {
            "preprocess_ms": preprocess_s * 1000,
            "forward_b1_ms": single_s * 1000,
            "forward_per_image_ms": min(one_pass_s, side_by_side_s) / self.size * 1000,
            "one_pass_per_image_ms": one_pass_s / self.size * 1000,
            "side_by_side_per_image_ms": side_by_side_s / self.size * 1000,
            "batch_size": self.size,
        }

    def close(self) -> None:
        self.passes.shutdown()
        self.classifier.close()


def around(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The costs during a round: the mean of those measured just before and just after it."""
    return {key: (before[key] + after[key]) / 2 for key in before}


async def load_in_rounds(
    servers: dict[str, Server],
    bodies: Sequence[tuple[bytes, str]],
    args: argparse.Namespace,
    bound: PipelineBound,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Both servers' load points in alternating rounds, the bound measured around each tuned one.

    This CPU's speed drifts by up to 2x within a minute, so each point is split into short
    rounds: a seed-style round, the bound (both servers idle: the cores to itself), a tuned
    round, the bound again. A tuned round is judged against the costs measured just before and
    after it, and against the seed-style round next to it.
    """
    out: dict[str, dict[str, list[dict[str, Any]]]] = {"seed": {}, "tuned": {}}
    seconds = args.duration / args.rounds
    for concurrency in args.concurrency:
        point = f"c{concurrency}"
        for index in range(args.rounds):
            seed = await measure(
                servers["seed"].url, bodies, concurrency=concurrency, duration_s=seconds
            )
            before = await asyncio.to_thread(bound.measure)
            tuned = await measure(
                servers["tuned"].url,
                bodies,
                concurrency=concurrency,
                duration_s=seconds,
                pid=servers["tuned"].pid,
            )
            tuned["costs"] = around(before, await asyncio.to_thread(bound.measure))
            out["seed"].setdefault(point, []).append(seed)
            out["tuned"].setdefault(point, []).append(tuned)
            print(
                f"  c={concurrency} round {index + 1}/{args.rounds}: seed-style "
                f"{seed['throughput']:.1f} images/s, tuned {tuned['throughput']:.1f} images/s "
                f"(p50 {tuned['p50_ms']:.1f} ms)",
                flush=True,
            )
    return out


def throughput(rounds: Sequence[dict[str, Any]]) -> float:
    """Images per second over all of a point's rounds."""
    return float(sum(r["ok"] for r in rounds) / sum(r["seconds"] for r in rounds))


def bound_throughput(costs: dict[str, float]) -> float:
    return 1000 / (costs["forward_per_image_ms"] + costs["preprocess_ms"])


def latency_budget_ms(costs: dict[str, float], max_wait_ms: float) -> float:
    return costs["preprocess_ms"] + costs["forward_b1_ms"] + max_wait_ms + 3


def targets(
    seed: dict[str, list[dict[str, Any]]],
    tuned: dict[str, list[dict[str, Any]]],
    max_wait_ms: float,
) -> list[dict[str, Any]]:
    """Each target, judged round by round: the median round counts."""
    high, low = tuned["c32"], tuned["c1"]
    versus_seed = statistics.median(
        r["throughput"] / s["throughput"] for r, s in zip(high, seed["c32"], strict=True)
    )
    share = statistics.median(r["throughput"] / bound_throughput(r["costs"]) for r in high)
    over_budget = statistics.median(
        r["p50_ms"] - latency_budget_ms(r["costs"], max_wait_ms) for r in low
    )
    lag = sum(r["loop_lag_samples_over_10ms"] for rounds in tuned.values() for r in rounds)
    checks = [
        ("throughput c=32 vs seed-style", versus_seed, ">=", 6.0),
        ("throughput c=32 vs pipeline bound", share, ">=", 0.85),
        ("p50 at c=1 minus its budget (ms)", over_budget, "<=", 0.0),
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
    ]


def rounds_table(
    seed: dict[str, list[dict[str, Any]]],
    tuned: dict[str, list[dict[str, Any]]],
    max_wait_ms: float,
) -> list[dict[str, Any]]:
    """One row per round: the tuned server's, next to the seed-style one's and the bound."""
    rows = []
    for point, rounds in tuned.items():
        for index, (r, s) in enumerate(zip(rounds, seed[point], strict=True), 1):
            rows.append(
                {
                    "round": f"{point} #{index}",
                    "seed": s["throughput"],
                    "throughput": r["throughput"],
                    "bound": bound_throughput(r["costs"]),
                    "p50_ms": r["p50_ms"],
                    "budget_ms": latency_budget_ms(r["costs"], max_wait_ms),
                    "server_forward_ms": r["server_forward_ms"],
                    "forward_b1_ms": r["costs"]["forward_b1_ms"],
                    "lag>10ms": r["loop_lag_samples_over_10ms"],
                    "cpu_wait": r.get("loop_cpu_wait_share"),
                }
            )
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    jpegs = sample_jpegs()
    bodies = [multipart(jpeg) for jpeg in jpegs]
    tuned_settings = with_overrides(TUNED, args.set)
    print("loading the model for the pipeline bound...", flush=True)
    bound = await asyncio.to_thread(PipelineBound, tuned_settings, jpegs)
    try:
        print("starting the seed-style and the tuned server...", flush=True)
        async with (
            started_server(SEED) as seed_server,
            started_server(tuned_settings) as tuned_server,
        ):
            servers = {"seed": seed_server, "tuned": tuned_server}
            for server in servers.values():
                await measure(server.url, bodies, concurrency=4, duration_s=3)  # untimed warm-up
            rounds = await load_in_rounds(servers, bodies, args, bound)
    finally:
        bound.close()
    seed, tuned = rounds["seed"], rounds["tuned"]
    max_wait_ms = tuned_settings["batching"]["max_wait_ms"]
    return {
        "machine": machine(),
        "settings": {"seed": SEED, "tuned": tuned_settings},
        "seed": seed,
        "tuned": tuned,
        "rounds": rounds_table(seed, tuned, max_wait_ms),
        "targets": targets(seed, tuned, max_wait_ms),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load point")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per load point and server")
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "compare.json")
    args = parser.parse_args(argv)
    args.concurrency = [32, 1]
    payload = asyncio.run(run(args))
    rows = []
    for name in ("seed", "tuned"):
        for point, rounds in payload[name].items():
            merged = {**rounds[0], "throughput": throughput(rounds)}
            merged["p50_ms"] = statistics.median(r["p50_ms"] for r in rounds)
            merged["p99_ms"] = statistics.median(r["p99_ms"] for r in rounds)
            rows.append({"server": name, "point": point, **merged})
    print(table(rows, ("server", "point", "throughput", "p50_ms", "p99_ms", "mean_batch")))
    print("\n(throughput over all rounds, latencies the median round's)\n")
    print(table(payload["rounds"], tuple(payload["rounds"][0])))
    ratio = throughput(payload["tuned"]["c32"]) / throughput(payload["seed"]["c32"])
    print(f"\ntuned / seed-style throughput at concurrency 32, all rounds: {ratio:.2f}x\n")
    print(table(payload["targets"], ("target", "measured", "goal", "met")))
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
