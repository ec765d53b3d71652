"""Load: real JPEG uploads, closed-loop and open-loop (Poisson), over loopback.

Each image goes as ``--protocol``: ``predict`` (multipart to /predict), ``oip-rest`` (the
Open Inference Protocol's binary tensors, as tritonclient.http sends them) or ``oip-grpc``
(``ModelInfer`` with raw_input_contents, as tritonclient.grpc sends them), so one script
compares the three on the same server. Reports throughput, latency percentiles, errors, and
from the server's own /metrics the batch sizes it formed and how long its event loop was ever
blocked.

    python -m benchmarks.load --concurrency 1,4,16,64 --rates 10,30 --duration 15
    python -m benchmarks.load --protocol oip-grpc --concurrency 1,2,4,8,16,32,64
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import socket
import struct
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import grpc

from batching_server.grpc.proto import grpc_predict_v2_pb2 as pb
from batching_server.grpc.proto import grpc_predict_v2_pb2_grpc as services
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


class Client(Protocol):
    """How one image is sent: its request built once, ahead of the run, then sent as is."""

    name: str

    def prepare(self, jpeg: bytes) -> Any: ...

    async def send(self, session: aiohttp.ClientSession, url: str, body: Any) -> str:
        """Send one prepared request; "200" when answered, else what went wrong."""
        ...


class PredictClient:
    """A multipart upload to /predict."""

    name = "predict"

    def prepare(self, jpeg: bytes) -> tuple[bytes, str]:
        return multipart(jpeg)

    async def send(self, session: aiohttp.ClientSession, url: str, body: tuple[bytes, str]) -> str:
        async with session.post(
            f"{url}/predict", data=body[0], headers={"Content-Type": body[1]}
        ) as response:
            await response.read()
            return str(response.status)


class OipRestClient:
    """``POST /v2/models/{model}/infer`` with the image as a binary BYTES tensor."""

    name = "oip-rest"

    def __init__(self, model: str) -> None:
        self.model = model

    def prepare(self, jpeg: bytes) -> tuple[bytes, dict[str, str]]:
        tensor = struct.pack("<I", len(jpeg)) + jpeg
        header = (
            '{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],'
            f'"parameters":{{"binary_data_size":{len(tensor)}}}}}],'
            '"outputs":[{"name":"probabilities","parameters":{"classification":1}}]}'
        ).encode()
        return header + tensor, {"Inference-Header-Content-Length": str(len(header))}

    async def send(
        self, session: aiohttp.ClientSession, url: str, body: tuple[bytes, dict[str, str]]
    ) -> str:
        async with session.post(
            f"{url}/v2/models/{self.model}/infer", data=body[0], headers=body[1]
        ) as response:
            await response.read()
            return str(response.status)


class OipGrpcClient:
    """``ModelInfer`` with the image in raw_input_contents, on one channel (HTTP/2 streams)."""

    name = "oip-grpc"

    def __init__(self, model: str, target: str) -> None:
        self.model = model
        self.target = target
        self._stub: Any = None

    def prepare(self, jpeg: bytes) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=self.model)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        output = request.outputs.add(name="probabilities")
        output.parameters["classification"].int64_param = 1
        request.raw_input_contents.append(struct.pack("<I", len(jpeg)) + jpeg)
        return request

    async def send(
        self, session: aiohttp.ClientSession, url: str, body: pb.ModelInferRequest
    ) -> str:
        if self._stub is None:  # made on the running loop, as grpc.aio needs
            channel = grpc.aio.insecure_channel(
                self.target, options=[("grpc.max_receive_message_length", -1)]
            )
            self._stub = services.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            await self._stub.ModelInfer(body, timeout=120)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "200"


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """What a client process needs to build its own Client (a Client does not pickle)."""

    protocol: str
    model: str = ""
    grpc_target: str = ""

    def make(self) -> Client:
        if self.protocol == "oip-rest":
            return OipRestClient(self.model)
        if self.protocol == "oip-grpc":
            return OipGrpcClient(self.model, self.grpc_target)
        return PredictClient()


class Recorder:
    """Latencies of successful requests and a count of every status."""

    def __init__(self, client: Client | None = None) -> None:
        self.client: Client = client or PredictClient()
        self.latencies_s: list[float] = []
        self.statuses: Counter[str] = Counter()

    async def send(self, session: aiohttp.ClientSession, url: str, body: Any) -> None:
        started = time.perf_counter()
        try:
            status = await self.client.send(session, url, body)
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
    client: Client | None = None,
) -> dict[str, Any]:
    """One load point; returns client-side and server-side figures.

    ``bodies`` are ``client``'s prepared requests (default: /predict uploads). With the
    server's ``pid`` (a server on this machine), also the share of the run its event loop
    spent waiting for a CPU.
    """
    require_loopback(url)
    recorder = Recorder(client)
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
    result = summarise(
        recorder,
        elapsed,
        before,
        after,
        protocol=recorder.client.name,
        concurrency=concurrency,
        rate=rate,
    )
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _model_name(url: str) -> str:
    """The served model's name, from the server's index (``GET /``)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/") as response:
        index = await response.json()
    return str(index["model"]["name"])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    jpegs = sample_jpegs()
    points: list[dict[str, Any]] = [{"concurrency": c} for c in args.concurrency]
    points += [{"rate": r} for r in args.rates]
    results = []

    async def drive(url: str, grpc_target: str, pid: int | None = None) -> None:
        client_model = "" if args.protocol == "predict" else await _model_name(url)
        spec = ClientSpec(args.protocol, client_model, grpc_target)
        client = spec.make()
        bodies = [client.prepare(jpeg) for jpeg in jpegs]
        # One short untimed run first: connection set-up and first-touch costs.
        await measure(url, bodies, concurrency=2, duration_s=2, client=client)
        # Imported here: load_procs builds on this module's client loops.
        from benchmarks.load_procs import measure_procs

        for point in points:
            if args.client_procs > 1:
                result = await measure_procs(
                    url,
                    spec,
                    procs=args.client_procs,
                    duration_s=args.duration,
                    pid=pid,
                    **point,
                )
            else:
                result = await measure(
                    url, bodies, duration_s=args.duration, pid=pid, client=client, **point
                )
            results.append(result)
            print(f"  {row(result)['point']}: {result['throughput']:.1f} images/s", flush=True)

    if args.url:
        host = urlsplit(args.url).hostname
        await drive(args.url, args.grpc_target or f"{host}:8001")
    else:
        settings = args.settings
        grpc_port = 0
        if args.protocol == "oip-grpc":
            grpc_port = _free_port()
            settings = with_overrides(settings, [f"oip.grpc_port={grpc_port}"])
        async with started_server(settings) as server:
            await drive(server.url, f"127.0.0.1:{grpc_port}", server.pid)
    return {
        "machine": machine(),
        "server": args.url or args.settings,
        "protocol": args.protocol,
        "results": results,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server on loopback (default: start one)")
    parser.add_argument(
        "--protocol",
        choices=["predict", "oip-rest", "oip-grpc"],
        default="predict",
        help="how each image is sent (default: predict)",
    )
    parser.add_argument(
        "--grpc-target",
        help="with --url and --protocol oip-grpc: the server's gRPC host:port (default: :8001)",
    )
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
