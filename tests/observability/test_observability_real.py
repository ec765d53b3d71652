"""Every signal checked by its real consumer: promtool, a Prometheus server, an OTLP receiver.

All traffic stays on 127.0.0.1; every wait is bounded; every process is killed on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import FormData, web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from batching_server.http.app import create_app
from batching_server.http.appkeys import READINESS
from batching_server.models import ModelRunner
from batching_server.observability.tracing import create_tracer_provider
from tests.conftest import AppClient, make_settings
from tests.images import PHOTOS, photo_bytes

TIMEOUT_S = 60
POLL_S = 0.25
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=TIMEOUT_S)


@functools.cache
def jpeg(index: int) -> bytes:
    """A real photograph as JPEG, cycling through PHOTOS."""
    return photo_bytes(PHOTOS[index % len(PHOTOS)])


def upload(data: bytes) -> FormData:
    form = FormData()
    form.add_field("file", data, filename="photo.jpg", content_type="image/jpeg")
    return form


async def post_photos(session: aiohttp.ClientSession, base: str, count: int) -> list[int]:
    """Statuses of ``count`` concurrent single-photo uploads to /predict."""

    async def one(index: int) -> int:
        async with session.post(f"{base}/predict", data=upload(jpeg(index))) as response:
            await response.read()
            return response.status

    return list(await asyncio.gather(*(one(i) for i in range(count))))


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port in this loop; yields its base URL once ready."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        if READINESS in app:
            await asyncio.wait_for(app[READINESS].wait_ready(), TIMEOUT_S)
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def run_tool(*argv: str, stdin: bytes) -> tuple[int, str]:
    """Exit status and combined output of a short-lived process fed ``stdin``."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(stdin), TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode()


# --- 1. promtool lints a real scrape ------------------------------------------------------


@pytest.mark.slow
async def test_promtool_accepts_a_real_scrape(app_client: AppClient) -> None:
    # The checker itself must be able to fail: a counter without _total is a lint problem.
    status, output = await run_tool(
        "promtool", "check", "metrics", stdin=b"# HELP x x\n# TYPE x counter\nx 1\n"
    )
    assert status != 0
    assert "_total" in output

    client = await app_client()
    assert (await client.post("/predict", data=upload(jpeg(0)))).status == 200
    assert (await client.post("/predict", data=upload(b"not an image"))).status == 400
    assert (await client.get("/no-such-route")).status == 404
    response = await client.get("/metrics")
    assert response.status == 200
    body = await response.read()
    # Labelled histograms and counters have series, so promtool sees them, not just HELP.
    for needle in (
        'http_request_duration_seconds_bucket{endpoint="/predict",le="+Inf",method="POST",'
        'status="4xx"}',
        'http_requests_total{endpoint="unmatched",method="GET",status="4xx"}',
        'http_errors_total{endpoint="/predict",error_type="invalid_image",method="POST"}',
        'batch_size_bucket{le="1.0"}',
    ):
        assert needle.encode() in body

    status, output = await run_tool("promtool", "check", "metrics", stdin=body)
    assert (status, output) == (0, "")


# --- 2. a real Prometheus server scrapes the running app ----------------------------------


def attempts() -> Iterator[int]:
    """Bounded polling: at most TIMEOUT_S / POLL_S tries, and at most TIMEOUT_S seconds."""
    deadline = time.monotonic() + TIMEOUT_S
    for attempt in range(int(TIMEOUT_S / POLL_S)):
        if time.monotonic() > deadline:
            return
        yield attempt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], tuple[str, subprocess.Popen[bytes]]]]:
    """Start ``prometheus`` scraping one loopback target every second; killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "prometheus.log").open("wb")

    def start(target: str) -> tuple[str, subprocess.Popen[bytes]]:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: app\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n",
            encoding="utf-8",
        )
        address = f"127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={address}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(process)
        return f"http://{address}", process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(TIMEOUT_S)
    log.close()


async def wait_ready(
    session: aiohttp.ClientSession, base: str, process: subprocess.Popen[bytes]
) -> None:
    for _ in attempts():
        assert process.poll() is None, "prometheus exited; see prometheus.log in tmp_path"
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with session.get(f"{base}/-/ready") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"prometheus at {base} was not ready within {TIMEOUT_S} s")


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> float | None:
    """The single value of an instant query, or None when it returns no series."""
    async with session.get(f"{base}/api/v1/query", params={"query": promql}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


async def poll(
    session: aiohttp.ClientSession, base: str, promql: str, done: Callable[[float], bool]
) -> float | None:
    """Query until ``done(value)``, at most TIMEOUT_S; returns the last value seen."""
    value = None
    for _ in attempts():
        value = await query(session, base, promql)
        if value is not None and done(value):
            break
        await asyncio.sleep(POLL_S)
    return value


@pytest.mark.slow
async def test_prometheus_scrapes_requests_and_batches(
    classifier: ModelRunner,
    prometheus: Callable[[str], tuple[str, subprocess.Popen[bytes]]],
) -> None:
    burst = 24
    settings = make_settings(batching={"max_batch_size": 8, "max_wait_ms": 200.0})
    app = create_app(settings, runner=classifier)
    async with serving(app) as app_base, aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        prom, process = await asyncio.to_thread(prometheus, app_base.removeprefix("http://"))
        await wait_ready(session, prom, process)
        # The target is up before the burst, so the burst lands in later scrapes.
        assert await poll(session, prom, 'up{job="app"}', lambda v: v == 1) == 1

        assert await post_photos(session, app_base, burst) == [200] * burst

        requests = 'http_requests_total{job="app",endpoint="/predict",method="POST",status="2xx"}'
        assert await poll(session, prom, requests, lambda v: v >= burst) == burst
        # The burst is over and fully scraped: each image went through exactly one batch.
        assert await query(session, prom, 'sum(batch_size_sum{job="app"})') == burst
        batches = await query(session, prom, 'sum(batch_size_count{job="app"})')
        assert batches is not None
        assert 1 <= batches < burst
        larger_than_one = (
            'sum(batch_size_count{job="app"}) - sum(batch_size_bucket{job="app",le="1.0"})'
        )
        assert (await query(session, prom, larger_than_one) or 0) >= 1
        assert await query(session, prom, 'sum(batch_dropped_total{job="app"})') == 0


# --- 3. OTLP/HTTP spans on the wire -------------------------------------------------------


def otlp_receiver(received: list[tuple[str, bytes]]) -> web.Application:
    """A collector's /v1/traces: stores (content type, body), answers an empty response."""

    async def traces(request: web.Request) -> web.Response:
        received.append((request.content_type, await request.read()))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    return app


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP key-values as a dict of Python values."""
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pairs}


def decode(bodies: list[bytes]) -> tuple[list[dict[str, Any]], list[Span]]:
    """Resource attributes and spans of every export request."""
    resources, spans = [], []
    for body in bodies:
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            resources.append(attributes(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                spans.extend(scope_spans.spans)
    return resources, spans


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* override and no proxy between the exporter and the loopback receiver."""
    for name in list(os.environ):
        if name.startswith("OTEL_") or "proxy" in name.lower():
            monkeypatch.delenv(name)


@pytest.mark.slow
@pytest.mark.usefixtures("clean_otel_env")
async def test_otlp_http_export_links_batches_to_requests(classifier: ModelRunner) -> None:
    requests = 6
    received: list[tuple[str, bytes]] = []
    async with serving(otlp_receiver(received)) as collector:
        settings = make_settings(
            batching={"max_batch_size": 8, "max_wait_ms": 300.0},
            tracing={
                "exporter": "otlp-http",
                "endpoint": f"{collector}/v1/traces",
                "service_name": "observability-real-test",
            },
        )
        provider = create_tracer_provider(settings.tracing)
        assert provider is not None
        try:
            app = create_app(settings, runner=classifier, tracer_provider=provider)
            async with (
                serving(app) as base,
                aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
            ):
                for path in ("/health", "/ready", "/metrics"):
                    async with session.get(f"{base}{path}") as response:
                        assert response.status == 200
                assert await post_photos(session, base, requests) == [200] * requests
            assert await asyncio.to_thread(provider.force_flush, TIMEOUT_S * 1000)
        finally:
            await asyncio.to_thread(provider.shutdown)

    assert received
    assert {content_type for content_type, _ in received} == {"application/x-protobuf"}
    resources, spans = decode([body for _, body in received])
    assert {r["service.name"] for r in resources} == {"observability-real-test"}

    # One SERVER span per upload and none for the excluded /health, /ready and /metrics.
    servers = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert [s.name for s in servers] == ["POST /predict"] * requests
    for server in servers:
        children = [s for s in spans if s.parent_span_id == server.span_id]
        assert sorted(c.name for c in children) == ["batcher.wait", "image.preprocess"]
        assert {c.trace_id for c in children} == {server.trace_id}

    # Batch spans are roots that link to each request exactly once, across all batches.
    batches = [s for s in spans if s.name == "resnet50.batch"]
    assert batches
    links = sorted((link.trace_id, link.span_id) for b in batches for link in b.links)
    assert links == sorted((s.trace_id, s.span_id) for s in servers)
    for batch in batches:
        assert batch.parent_span_id == b""
        attrs = attributes(batch.attributes)
        size = next(kv.value for kv in batch.attributes if kv.key == "batch.size")
        assert size.WhichOneof("value") == "int_value"
        assert attrs["batch.size"] == len(batch.links)
        assert attrs["batch.dispatch_reason"] in {"full", "timeout", "drain", "idle"}
        # Added in the model's executor thread: the batch span's context got there.
        forward = [e for e in batch.events if e.name == "forward_pass"]
        assert len(forward) == 1
        assert attributes(forward[0].attributes)["thread"].startswith("model")
