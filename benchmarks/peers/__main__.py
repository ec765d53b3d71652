"""This server against its peers, same model code, same uploads, in alternating rounds.

This server runs its defaults (their compiled graphs built first, as a first start builds
them in the background) and eagerly; the peers are LitServe (eager, and compiled with batches
padded to 1/2/4/8) and the seed's naive FastAPI design (one image per forward pass), all with
``model_code.PeerModel``. They
run in an environment of their own, made by this script (``benchmarks/.peers-venv``: torch,
torchvision and Pillow come from this project's environment, the peers' packages are pinned
here). Every server starts at once and stays up; each takes its turn per round and load
point, so a drift of the machine's speed touches them all alike; the others are stopped
(SIGSTOP) while one is measured, so no idle server's background work tilts the result.

    python -m benchmarks.peers --duration 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks._common import (
    RESULTS,
    ROOT,
    machine,
    multipart,
    percentile,
    require_loopback,
    sample_jpegs,
    table,
    write_json,
)
from benchmarks.load import Recorder, closed_loop

PEERS_ENV = ROOT / "benchmarks" / ".peers-venv"
REQUIREMENTS = ("litserve==0.2.19", "fastapi>=0.112", "uvicorn>=0.29", "python-multipart>=0.0.9")
# The defaults compile in the background on a first start; the run measures what serves from
# then on: the compiled graphs, which it builds first (`batching-server compile`).
OURS_EAGER = {"BATCHING_SERVER_MODEL__COMPILE": "false"}
# Opt-in: int8 graphs (built before the server is ready, so built first here too).
OURS_INT8 = {"BATCHING_SERVER_MODEL__PRECISION": "int8"}
SERVERS = ("ours", "ours-eager", "ours-int8", "litserve", "litserve-compiled", "naive-fastapi")
SETTLE_S = 1.0
READY_TIMEOUT_S = 1800  # compiling every shape on a small CPU takes minutes


def peers_python() -> Path:
    """The peers' interpreter, after making or refreshing their environment."""
    python = PEERS_ENV / "bin" / "python"
    stamp = PEERS_ENV / ".requirements"
    wanted = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEERS_ENV)], check=True)
    # torch, torchvision and Pillow from this project's environment (the same builds, and no
    # second multi-gigabyte download): a .pth line puts its site-packages on the path.
    import site

    own = [p for p in site.getsitepackages() if Path(p).is_dir()]
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "project-packages.pth").write_text("\n".join(own) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    stamp.write_text(wanted)
    return python


def _probe(name: str) -> str:
    """The path that answers 200 once the server can serve (ours: after warm-up)."""
    return "/ready" if name.startswith("ours") else "/health"


def _command(name: str, python: Path, port: int) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHING_SERVER_")}
    env["BATCHING_SERVER_MODEL__WEIGHTS"] = "random"
    env["BATCHING_SERVER_OIP__GRPC_PORT"] = "0"  # the peers are compared over HTTP only
    if name.startswith("ours"):
        if name == "ours-eager":
            env.update(OURS_EAGER)
        if name == "ours-int8":
            env.update(OURS_INT8)
        return [
            sys.executable,
            "-m",
            "batching_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ], env
    module = "naive_server" if name == "naive-fastapi" else "litserve_server"
    command = [str(python), "-m", f"benchmarks.peers.{module}", "--port", str(port)]
    if name == "litserve-compiled":
        command.append("--compile")
    return command, env


async def _wait_ready(
    session: aiohttp.ClientSession, url: str, probe: str, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url + probe) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(1)
    raise RuntimeError(f"{url} was not ready within {READY_TIMEOUT_S} s")


def _start(name: str, python: Path, port: int, logs: Path) -> subprocess.Popen[bytes]:
    """Start one server in its own process group (so its workers stop with it)."""
    command, env = _command(name, python, port)
    with (logs / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


@contextlib.contextmanager
def _alone(processes: dict[str, subprocess.Popen[bytes]], name: str) -> Iterator[None]:
    """Stop every other server (SIGSTOP) while ``name`` is measured.

    Idle servers are not idle everywhere: LitServe's workers poll their queues, and this
    server's model threads run at a low priority, so another server's background work would
    tilt the comparison. Stopped, the others cost nothing and keep their state.
    """
    others = [p for n, p in processes.items() if n != name]
    for process in others:
        os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for process in others:
            os.killpg(process.pid, signal.SIGCONT)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _measure(
    session: aiohttp.ClientSession,
    url: str,
    bodies: Sequence[tuple[bytes, str]],
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    require_loopback(url)
    recorder = Recorder()
    started = time.perf_counter()
    await closed_loop(session, url, bodies, concurrency, seconds, recorder)
    elapsed = time.perf_counter() - started
    latencies = sorted(s * 1000 for s in recorder.latencies_s)
    return {
        "seconds": elapsed,
        "ok": len(latencies),
        "errors": {s: n for s, n in recorder.statuses.items() if s != "200"},
        "throughput": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    python = peers_python()
    bodies = [multipart(jpeg) for jpeg in sample_jpegs()]
    logs = Path(tempfile.mkdtemp(prefix="peers-"))
    processes: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        for compiled in ("ours", "ours-int8"):
            if compiled not in args.servers:
                continue
            print(f"building {compiled}'s compiled graphs (once: later runs load them)...")
            command, env = _command(compiled, python, 0)
            await asyncio.to_thread(
                subprocess.run, [*command[:3], "compile"], cwd=ROOT, env=env, check=True
            )
        for name in args.servers:
            port = _free_port()
            processes[name] = _start(name, python, port, logs)
            urls[name] = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=300)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            for name, url in urls.items():
                print(f"waiting for {name} (log: {logs / (name + '.log')})...", flush=True)
                await _wait_ready(session, url, _probe(name), processes[name])
                await _measure(session, url, bodies, 2, 3)  # untimed: connections, caches
            rounds: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in urls}
            for index in range(args.rounds):
                for concurrency in args.concurrency:
                    # A different order each round: no server always follows the same one.
                    order = list(urls)[index % len(urls) :] + list(urls)[: index % len(urls)]
                    for name in order:
                        with _alone(processes, name):
                            # Resumed, a server first closes the keep-alive connections that
                            # timed out while it was stopped: not in the middle of the run.
                            await asyncio.sleep(SETTLE_S)
                            result = await _measure(
                                session, urls[name], bodies, concurrency, args.duration
                            )
                        rounds[name].setdefault(f"c{concurrency}", []).append(result)
                        print(
                            f"  round {index + 1} c={concurrency} {name}: "
                            f"{result['throughput']:.1f} images/s, p50 {result['p50_ms']:.1f} ms",
                            flush=True,
                        )
    finally:
        for process in processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return {"machine": machine(), "requirements": list(REQUIREMENTS), "rounds": rounds}


def summary(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per server and load point: throughput over all rounds, the median round's
    latencies."""
    rows = []
    for name, points in payload["rounds"].items():
        for point, results in points.items():
            seconds = sum(r["seconds"] for r in results)
            rows.append(
                {
                    "server": name,
                    "point": point,
                    "throughput": sum(r["ok"] for r in results) / seconds,
                    "p50_ms": statistics.median(r["p50_ms"] for r in results),
                    "p99_ms": statistics.median(r["p99_ms"] for r in results),
                    "errors": sum(sum(r["errors"].values()) for r in results),
                }
            )
    return rows


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round and point")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=_ints, default=[1, 32])
    parser.add_argument(
        "--servers", type=lambda t: t.split(","), default=list(SERVERS),
        help=f"a comma-separated subset of {','.join(SERVERS)}",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args(argv)
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    payload = asyncio.run(run(args))
    payload["summary"] = summary(payload)
    print(
        table(payload["summary"], ("server", "point", "throughput", "p50_ms", "p99_ms", "errors"))
    )
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
