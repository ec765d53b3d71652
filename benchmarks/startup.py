"""How long a start takes, phase by phase: eager, a first compiled start, and later ones.

Each start is a fresh ``python -m batching_server`` process with the product's defaults (and
``--set`` overrides); the times are when its log lines arrive, from the moment it was spawned:
``starting`` (Python and the package imported), ``model_loaded``, ``listening``,
``model_compiled`` / ``model_not_compiled`` and ``ready``; and its resident memory once ready.
The compiled starts share one compile cache folder (``--cache-dir``; a fresh temporary one
by default, so the first compiles every shape, with ``model.compile = true``); the later ones
run the default (``auto``), which loads what the first built.

    python -m benchmarks.startup --warm-starts 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine, settings_env, table, write_json
from benchmarks.load import add_set_option, with_overrides
from benchmarks.soak import rss_mb

__all__ = ["PHASES", "main", "start_once"]

PHASES = ("starting", "model_loaded", "listening", "compiled", "ready")
READY_TIMEOUT_S = 3600.0  # a cold compile of every shape takes minutes on a small CPU


async def start_once(settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Spawn one server, time its phases until it is ready, then stop it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHING_SERVER_")}
    env.update(settings_env({"model": {"weights": "random"}, "oip": {"grpc_port": 0}}))
    env.update(settings_env(settings))
    spawned = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batching_server", "--host", "127.0.0.1", "--port", "0",
        cwd=RESULTS.parent, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    seen: dict[str, float] = {}
    facts: dict[str, Any] = {}
    try:
        deadline = spawned + READY_TIMEOUT_S
        while "ready" not in seen:
            line = await asyncio.wait_for(
                process.stdout.readline(), max(1.0, deadline - time.perf_counter())
            )
            if not line:
                raise RuntimeError(f"the server exited with {await process.wait()} before ready")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.get("event")
            if name in ("model_compiled", "model_not_compiled"):
                facts["compiled"] = name == "model_compiled"
                facts["compile_reason"] = event.get("reason")
                name = "compiled"
            elif name == "compiled_graph_built":
                facts["graphs_built"] = facts.get("graphs_built", 0) + 1
            elif name == "compiled_graph_loaded":
                facts["graphs_loaded"] = facts.get("graphs_loaded", 0) + 1
            elif name == "failed":
                raise RuntimeError(f"the server failed to start: {event.get('reason')}")
            if name in PHASES and name not in seen:
                seen[name] = time.perf_counter() - spawned
        # Memory once ready: the model, and each compiled graph's own copy of the weights.
        rss = rss_mb(process.pid)
        facts["rss_mb"] = None if math.isnan(rss) else rss
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 120)
            except TimeoutError:
                process.kill()
                await process.wait()
    return {"seconds": seen, **facts}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = with_overrides({}, args.set)
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="batching-server-startup-"))
    model = base.get("model", {})
    eager = {**base, "model": {**model, "compile": "false"}}
    cached = {**model, "compile_cache_dir": str(cache)}
    # The first compiled start compiles before it is ready (true); the later ones run the
    # default (auto), which loads a complete cache before it is ready.
    first = {**base, "model": {**cached, "compile": "true"}}
    later = {**base, "model": {**cached, "compile": "auto"}}
    plan = [("eager", eager)] * args.eager_starts
    plan += [("first compiled", first)] + [("cached", later)] * args.warm_starts
    runs: list[dict[str, Any]] = []
    for number, (label, settings) in enumerate(plan):
        print(f"start {number + 1}/{len(plan)}: {label}", flush=True)
        result = {"kind": label, **await start_once(settings)}
        print(f"  ready after {result['seconds']['ready']:.1f} s", flush=True)
        runs.append(result)
    return {
        "machine": machine(),
        "settings": {"eager": eager, "first compiled": first, "cached": later},
        "runs": runs,
        "summary": summary(runs),
    }


def summary(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kind of start: the median of each phase's time."""
    rows = []
    for kind in dict.fromkeys(r["kind"] for r in runs):
        mine = [r for r in runs if r["kind"] == kind]
        row: dict[str, Any] = {"kind": kind, "starts": len(mine)}
        for phase in PHASES:
            times = [r["seconds"][phase] for r in mine if phase in r["seconds"]]
            row[phase] = statistics.median(times) if times else None
        rss = [r["rss_mb"] for r in mine if r.get("rss_mb") is not None]
        row["rss_mb"] = statistics.median(rss) if rss else None
        row["graphs_built"] = sum(r.get("graphs_built", 0) for r in mine)
        row["graphs_loaded"] = sum(r.get("graphs_loaded", 0) for r in mine)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eager-starts", type=int, default=1, help="starts without compiling")
    parser.add_argument(
        "--warm-starts", type=int, default=3, help="compiled starts after the first"
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="compile cache folder (default: a fresh temporary one)"
    )
    add_set_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    args = parser.parse_args(argv)
    payload = asyncio.run(run(args))
    columns = ("kind", "starts", *PHASES, "rss_mb", "graphs_built", "graphs_loaded")
    print(table(payload["summary"], columns))
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
