"""Shared by the HTTP benchmarks: sample uploads, a server process, metrics, output."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import ipaddress
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Real photographs shipped inside scikit-image (a dev dependency).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def machine() -> dict[str, Any]:
    """What ran the benchmark, for the JSON and the README."""
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import torch

    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def sample_jpegs(size: tuple[int, int] = (500, 375), quality: int = 90) -> list[bytes]:
    """The real photos, resized to ``size`` and encoded as JPEG: the uploads we send."""
    from importlib import resources

    out = []
    for name in PHOTOS:
        path = Path(str(resources.files("skimage") / "data" / name))
        with Image.open(path) as image:
            buffer = io.BytesIO()
            image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
                buffer, "JPEG", quality=quality
            )
            out.append(buffer.getvalue())
    return out


def multipart(jpeg: bytes) -> tuple[bytes, str]:
    """A ready-made multipart body, so the load generator spends no CPU building it."""
    boundary = "benchmarkboundary7f3a"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def require_loopback(url: str) -> None:
    """Load is only ever sent to this machine."""
    host = urlsplit(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to send load to {host}: benchmarks target loopback only")


def settings_env(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{"batching": {"max_batch_size": 8}}`` as BATCHING_SERVER_* variables (TOML values)."""
    env = {}
    for section, values in settings.items():
        for key, value in values.items():
            env[f"BATCHING_SERVER_{section.upper()}__{key.upper()}"] = json.dumps(value)
    return env


@dataclass(frozen=True, slots=True)
class Server:
    """A started server: its base URL, and its process id (to read its memory)."""

    url: str
    pid: int


@contextlib.asynccontextmanager
async def server_process(
    settings: Mapping[str, Mapping[str, Any]], *, ready_timeout_s: float = 900
) -> AsyncIterator[str]:
    """Run ``python -m batching_server`` with ``settings``; yield its URL once ready."""
    async with started_server(settings, ready_timeout_s=ready_timeout_s) as server:
        yield server.url


@contextlib.asynccontextmanager
async def started_server(
    settings: Mapping[str, Mapping[str, Any]], *, ready_timeout_s: float = 900
) -> AsyncIterator[Server]:
    """Like server_process, but yields the URL with the server's process id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHING_SERVER_")}
    # No gRPC port unless the run asks for one: 8001 may be taken on a shared machine.
    env.update(settings_env({"model": {"weights": "random"}, "oip": {"grpc_port": 0}}))
    env.update(settings_env(settings))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batching_server", "--host", "127.0.0.1", "--port", "0",
        cwd=RESULTS.parent, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = await asyncio.wait_for(process.stdout.readline(), 120)
            if not line:
                raise RuntimeError(f"server exited with {await process.wait()} before listening")
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "listening":
                    url = f"http://127.0.0.1:{event['port']}"
        if url is None:
            raise RuntimeError("server did not log its address in time")
        # Keep draining its log so the pipe never fills and blocks the server.
        drain = asyncio.create_task(_drain(process.stdout))
        await _wait_ready(url, ready_timeout_s)
        yield Server(url, process.pid)
        drain.cancel()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not ready within {timeout_s} s")


async def scrape(
    session: aiohttp.ClientSession, url: str
) -> dict[tuple[str, frozenset[Any]], float]:
    """The server's /metrics as {(name, labels): value}."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = frozenset(_LABEL.findall(match.group(3) or ""))
            samples[(match.group(1), labels)] = float(match.group(4))
    return samples


def histogram_delta(
    before: Mapping[Any, float], after: Mapping[Any, float], name: str
) -> dict[float, float]:
    """Per-bucket counts (not cumulative) of ``name`` between two scrapes, by upper bound."""
    cumulative = {}
    for (metric, labels), value in after.items():
        if metric == f"{name}_bucket":
            le = dict(labels)["le"]
            bound = float("inf") if le == "+Inf" else float(le)
            cumulative[bound] = value - before.get((metric, labels), 0.0)
    counts, previous = {}, 0.0
    for bound in sorted(cumulative):
        counts[bound] = cumulative[bound] - previous
        previous = cumulative[bound]
    return counts


def counter_delta(before: Mapping[Any, float], after: Mapping[Any, float], name: str) -> float:
    """How much ``name`` grew between two scrapes (summed over labels); NaN if absent."""
    grown = [v - before.get(key, 0.0) for key, v in after.items() if key[0] == name]
    return sum(grown) if grown else float("nan")


def histogram_mean(before: Mapping[Any, float], after: Mapping[Any, float], name: str) -> float:
    """Mean of ``name``'s observations between two scrapes (summed over labels); NaN if none."""

    def total(samples: Mapping[Any, float], suffix: str) -> float:
        return sum(v for (metric, _), v in samples.items() if metric == f"{name}_{suffix}")

    count = total(after, "count") - total(before, "count")
    return (total(after, "sum") - total(before, "sum")) / count if count else float("nan")


def thread_cpu_wait_s(pid: int, tid: int | None = None) -> float | None:
    """Seconds a thread has waited, runnable, for a CPU so far (Linux), or None elsewhere.

    ``tid`` defaults to ``pid``: a process's main thread, which is the server's event loop.
    A forensic probe for benchmarks: how much of the loop's lag was a wait for a core, which
    only fewer busy threads or more cores can cure, rather than the process's own work.
    """
    try:
        # "<ns on the CPU> <ns waiting on a run queue> <time slices>"
        fields = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
    except OSError:
        return None
    return int(fields[1]) / 1e9


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1]


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (floats to 1 decimal)."""

    def cell(value: Any) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
