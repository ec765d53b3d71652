"""Metrics, spans and logs of the real app, read back the way their consumers read them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import FormData, web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from batching_server import __version__
from batching_server.http.app import create_metrics_app
from batching_server.models import ModelRunner
from batching_server.observability import tracing
from batching_server.observability.logs import configure_logging
from batching_server.observability.metrics import ServiceMetrics
from batching_server.observability.tracing import create_tracer_provider
from batching_server.settings import TracingSettings
from tests.conftest import AppClient, make_settings, saturate
from tests.fakes import SpyRunner
from tests.images import photo_bytes
from tests.metrics_text import parse_metrics, scrape, value

JPEG = photo_bytes("chelsea.png")


def form(*files: bytes) -> FormData:
    data = FormData()
    for content in files:
        data.add_field("file", content, filename="x.jpg", content_type="image/jpeg")
    return data


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


# --- metrics ---------------------------------------------------------------------------------


async def test_golden_signals_and_batch_metrics(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    spy = SpyRunner(classifier)
    client = await app_client(model=spy, batching={"max_batch_size": 4, "max_wait_ms": 10_000.0})
    responses = await asyncio.gather(*(client.post("/predict", data=form(JPEG)) for _ in range(4)))
    assert [r.status for r in responses] == [200] * 4
    assert (await client.post("/predict", data=form(b"not an image"))).status == 400
    assert (await client.get("/no/such/path")).status == 404

    samples = await scrape(client)
    predict_ok = {"method": "POST", "endpoint": "/predict", "status": "2xx"}
    assert value(samples, "http_requests_total", **predict_ok) == 4
    assert value(samples, "http_request_duration_seconds_count", **predict_ok) == 4
    assert value(samples, "http_requests_total", method="POST", endpoint="/predict", status="4xx")
    assert (
        value(
            samples,
            "http_errors_total",
            method="POST",
            endpoint="/predict",
            error_type="invalid_image",
        )
        == 1
    )
    # The raw path never becomes a label value: cardinality stays bounded.
    assert value(samples, "http_requests_total", method="GET", endpoint="unmatched", status="4xx")
    assert not any("/no/such/path" in str(labels) for _, labels in samples)

    assert spy.batch_sizes == [4]
    assert value(samples, "batch_size_count") == 1
    assert value(samples, "batch_size_bucket", le="3.0") == 0
    assert value(samples, "batch_size_bucket", le="4.0") == 1
    assert value(samples, "batch_dispatch_total", reason="full") == 1
    assert value(samples, "batch_queue_wait_seconds_count") == 4
    assert value(samples, "model_inference_duration_seconds_count", model_name="resnet50") == 1
    assert value(samples, "image_preprocess_duration_seconds_count") == 5  # 4 good, 1 bad
    assert value(samples, "model_prediction_confidence_count") == 4
    predicted = [v for (name, _), v in samples.items() if name == "model_predictions_total"]
    assert sum(predicted) == 4
    assert value(samples, "inference_queue_size") == 0
    assert value(samples, "http_requests_in_flight") == 1  # the scrape itself
    assert value(samples, "model_memory_usage_bytes") > 90_000_000  # ResNet-50, fp32
    info = [labels for (name, labels), _ in samples.items() if name == "model_info"]
    assert dict(info[0]) == {
        "version": __version__,
        "model_name": "resnet50",
        "weights": "random",
        "device": "cpu",
        "precision": "fp32",
    }


async def _stall_the_loop(metrics: ServiceMetrics, blocked_s: float) -> dict[Any, float]:
    """Hog the loop for ``blocked_s`` of CPU while the lag watcher runs; the scrape after."""
    watcher = asyncio.create_task(metrics.watch_loop_lag(interval_s=0.001))
    await asyncio.sleep(0)  # the watcher takes its first readings and goes to sleep
    started = time.thread_time()
    while time.thread_time() - started < blocked_s:  # a callback that hogs the loop
        pass
    for _ in range(1000):  # bounded: the overdue timer fires within a few iterations
        await asyncio.sleep(0.001)
        samples = parse_metrics(metrics.render(["text/plain"])[0].decode())
        if value(samples, "event_loop_cpu_seconds_total") >= blocked_s:
            break
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    return samples


def _samples_over(samples: dict[Any, float], histogram: str, le: str) -> float:
    return value(samples, f"{histogram}_count") - value(samples, f"{histogram}_bucket", le=le)


async def test_loop_lag_and_loop_cpu_see_a_blocking_callback() -> None:
    metrics = ServiceMetrics(model_name="resnet50", max_batch_size=1)
    blocked = 0.03
    samples = await _stall_the_loop(metrics, blocked)
    assert value(samples, "event_loop_cpu_seconds_total") >= blocked
    # Wall time is at least CPU time, so one sample lands past the 25 ms bucket.
    assert _samples_over(samples, "event_loop_lag_seconds", "0.025") >= 1


async def test_metrics_port_moves_metrics_off_the_api(
    app_client: AppClient, aiohttp_client: Any
) -> None:
    client = await app_client(metrics={"port": 9464})
    assert (await client.get("/metrics")).status == 404
    assert (await client.get("/health")).status == 200
    index = await (await client.get("/")).json()
    assert index["endpoints"]["GET /metrics"] == "Prometheus metrics, on port 9464"
    metrics_client = await aiohttp_client(create_metrics_app(client.app))
    # The separate listener serves the API app's own registry: it sees the API's traffic.
    samples = await scrape(metrics_client)
    assert (
        value(samples, "http_requests_total", method="GET", endpoint="/health", status="2xx") == 1
    )
    assert (await metrics_client.get("/predict")).status == 404  # nothing but /metrics there


async def test_drops_are_counted_by_reason(app_client: AppClient, classifier: ModelRunner) -> None:
    client, spy, pending = await saturate(app_client, classifier, lambda: form(JPEG))
    assert value(await scrape(client), "inference_queue_size") == 1
    assert (await client.post("/predict", data=form(JPEG))).status == 503
    spy.gate.set()
    assert [(await r).status for r in pending] == [200, 200]
    samples = await scrape(client)
    assert value(samples, "batch_dropped_total", reason="rejected") == 1
    assert value(samples, "batch_dropped_total", reason="expired") == 0
    assert value(samples, "batch_dispatch_total", reason="full") == 2  # size 1 is always full


# --- spans -----------------------------------------------------------------------------------


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in finished if span.name == name]


async def test_span_tree_and_batch_links(
    app_client: AppClient, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    client = await app_client(
        tracer_provider=provider, batching={"max_batch_size": 3, "max_wait_ms": 10_000.0}
    )
    responses = await asyncio.gather(*(client.post("/predict", data=form(JPEG)) for _ in range(3)))
    assert [r.status for r in responses] == [200] * 3
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path)).status == 200

    finished = exporter.get_finished_spans()
    servers = [s for s in finished if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == ["POST /predict"] * 3  # probes and scrapes excluded
    for server in servers:
        children = [s for s in finished if s.parent and s.parent.span_id == server.context.span_id]
        assert sorted(s.name for s in children) == ["batcher.wait", "image.preprocess"]
        assert all(s.context.trace_id == server.context.trace_id for s in children)
        assert server.attributes is not None
        assert server.attributes.get("http.status_code", 200) == 200

    (batch,) = by_name(finished, "resnet50.batch")
    linked = {(link.context.trace_id, link.context.span_id) for link in batch.links}
    assert linked == {(s.context.trace_id, s.context.span_id) for s in servers}
    assert batch.attributes is not None
    assert batch.attributes["batch.size"] == 3
    assert batch.attributes["batch.dispatch_reason"] == "full"
    assert batch.attributes["model.device"] == "cpu"
    assert batch.attributes["batch.queue_wait_ms.max"] >= 0
    # Recorded in the model's executor thread: the context crossed the thread boundary.
    (event,) = batch.events
    assert event.name == "forward_pass"
    assert event.attributes is not None
    assert str(event.attributes["thread"]).startswith("model")


async def test_server_span_continues_the_clients_trace(
    app_client: AppClient, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    client = await app_client(tracer_provider=provider)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    response = await client.post("/predict", data=form(JPEG), headers={"traceparent": traceparent})
    assert response.status == 200
    (server,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"


# --- logs ------------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[Any]:
    """Configure JSON logging into a buffer, as the server does into stdout; restore after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffer = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=buffer)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    yield lines
    root.handlers, root.level = saved[0], saved[1]
    structlog.reset_defaults()


async def test_log_lines_are_json_and_correlate_with_spans(
    app_client: AppClient,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    json_logs: Any,
) -> None:
    provider, exporter = spans
    client = await app_client(
        tracer_provider=provider, batching={"max_batch_size": 2, "max_wait_ms": 10_000.0}
    )
    responses = await asyncio.gather(*(client.post("/predict", data=form(JPEG)) for _ in range(2)))
    request_ids = sorted(r.headers["X-Request-ID"] for r in responses)
    assert (await client.post("/predict", data=form(b"junk"))).status == 400

    lines = json_logs()  # every line parsed as JSON, or this raises
    completed = [line for line in lines if line["event"] == "request_completed"]
    assert sorted(line["request_id"] for line in completed) == request_ids
    finished = exporter.get_finished_spans()
    servers = {
        format(s.context.span_id, "016x"): format(s.context.trace_id, "032x")
        for s in finished
        if s.kind == SpanKind.SERVER
    }
    for line in completed:
        assert line["method"] == "POST"
        assert line["route"] == "/predict"
        assert line["status"] == 200
        assert line["images"] == 1
        assert isinstance(line["duration_ms"], float)
        assert servers[line["span_id"]] == line["trace_id"]

    (failed,) = [line for line in lines if line["event"] == "request_failed"]
    assert (failed["status"], failed["error_type"]) == (400, "invalid_image")

    (batch_line,) = [line for line in lines if line["event"] == "batch_completed"]
    (batch_span,) = by_name(finished, "resnet50.batch")
    assert batch_line["trace_id"] == format(batch_span.context.trace_id, "032x")
    assert batch_line["request_ids"] == request_ids
    assert (batch_line["size"], batch_line["dispatch_reason"]) == (2, "full")
    assert batch_line["inference_ms"] > 0


async def test_answers_go_out_before_their_request_and_batch_lines(
    app_client: AppClient, json_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Logging right after a forward pass is slow (cold caches): the client must not wait
    # for it.
    logged_at_send: list[list[str]] = []
    write_eof = web.StreamResponse.write_eof

    async def recording_write_eof(self: web.StreamResponse, data: bytes = b"") -> None:
        logged_at_send.append([line["event"] for line in json_logs()])
        await write_eof(self, data)

    monkeypatch.setattr(web.StreamResponse, "write_eof", recording_write_eof)
    client = await app_client()
    assert (await client.post("/predict", data=form(JPEG))).status == 200
    assert "request_completed" not in logged_at_send[0]
    assert "batch_completed" not in logged_at_send[0]
    events = [line["event"] for line in json_logs()]
    assert events.count("request_completed") == events.count("batch_completed") == 1


async def test_a_client_gone_before_its_answer_is_counted_as_closed(
    app_client: AppClient, json_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def reset(self: web.StreamResponse, data: bytes = b"") -> None:
        raise ConnectionResetError("the client went away")

    client = await app_client()
    monkeypatch.setattr(web.StreamResponse, "write_eof", reset)
    with pytest.raises(aiohttp.ClientError):
        await (await client.post("/predict", data=form(JPEG))).read()
    monkeypatch.undo()
    (line,) = [line for line in json_logs() if line.get("route") == "/predict"]
    assert (line["event"], line["status"], line["error_type"]) == (
        "request_failed",
        499,
        "client_closed_request",
    )
    samples = await scrape(client)
    assert value(samples, "http_requests_total", method="POST", endpoint="/predict", status="4xx")


async def test_without_an_exporter_spans_carry_ids_and_record_nothing(
    app_client: AppClient, json_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_instrumentation(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("OpenTelemetry's aiohttp middleware does work no one records")

    monkeypatch.setattr(tracing, "create_aiohttp_middleware", no_instrumentation)
    client = await app_client()  # tracing on, exporter "none": the defaults
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    traceparent = f"00-{trace_id}-{parent_id}-01"
    response = await client.post("/predict", data=form(JPEG), headers={"traceparent": traceparent})
    assert response.status == 200
    assert (await client.post("/predict", data=form(JPEG))).status == 200
    completed = [line for line in json_logs() if line["event"] == "request_completed"]
    assert len(completed) == 2
    # The client's trace goes on, under a span of our own; a request without one starts one.
    assert completed[0]["trace_id"] == trace_id
    assert completed[0]["span_id"] not in (parent_id, "0" * 16)
    assert completed[1]["trace_id"] not in (trace_id, "0" * 32)


def test_spans_are_recorded_only_when_they_can_be_exported() -> None:
    unexported = create_tracer_provider(TracingSettings(exporter="none"))
    exported = create_tracer_provider(TracingSettings(exporter="console"))
    assert unexported is not None
    assert exported is not None
    try:
        assert not unexported.get_tracer("t").start_span("s").is_recording()
        assert exported.get_tracer("t").start_span("s").is_recording()
    finally:
        unexported.shutdown()
        exported.shutdown()


# --- tracing settings and the standard OTEL_* variables --------------------------------------


def test_otel_environment_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = create_tracer_provider(TracingSettings(service_name="from-settings"))
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "from-env"
        span = provider.get_tracer("t").start_span("s")
        assert not span.is_recording()  # always_off, not our sample_ratio of 1.0
    finally:
        provider.shutdown()


def test_tracing_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    assert create_tracer_provider(TracingSettings(enabled=False)) is None
    provider = create_tracer_provider(TracingSettings(service_name="svc", sample_ratio=0.0))
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "svc"
        assert not provider.get_tracer("t").start_span("s").is_recording()
    finally:
        provider.shutdown()


async def test_a_checkpoints_directory_is_never_shown(app_client: AppClient, tmp_path: Any) -> None:
    # The app is given the shared model; the settings only need the file to exist.
    checkpoint = tmp_path / "private-dir" / "finetuned.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"")
    client = await app_client(make_settings(model={"weights": str(checkpoint)}))
    index = await (await client.get("/")).json()
    assert index["model"]["weights"] == "finetuned.pt"
    text = await (await client.get("/metrics")).text()
    assert "private-dir" not in text
    info = [labels for (name, labels), _ in parse_metrics(text).items() if name == "model_info"]
    assert dict(info[0])["weights"] == "finetuned.pt"
