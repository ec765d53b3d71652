"""Property test: whatever the query string and the headers, no route answers with a 5xx.

Requests go over a raw socket to the real app (with bearer keys, so that their middleware
reads the headers too), since header bytes that are not UTF-8, or not what a client library
would send, are part of the input. The example count is bounded and derandomised for CI.
"""

from __future__ import annotations

import string
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import AppClient
from tests.http.rawhttp import exchange, request_head

KEY = "k" * 20
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,  # CI sees exactly these examples, nothing replayed from earlier runs
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PATHS = ("/", "/health", "/ready", "/metrics", "/predict", "/nowhere", "/predict/")
# Headers the server or its middlewares read, and some that only a proxy would send.
NAMES = (
    "Authorization",
    "X-Request-Timeout",
    "X-Request-ID",
    "Content-Type",
    "Content-Encoding",
    "Accept",
    "Accept-Encoding",
    "traceparent",
    "tracestate",
    "Cookie",
    "Range",
    "If-None-Match",
    "Forwarded",
    "X-Forwarded-For",
    "Origin",
)
# Framing headers are left out: they would only make the server wait for a body never sent.
LEFT_OUT = {
    "content-length",
    "transfer-encoding",
    "connection",
    "expect",
    "upgrade",
    "host",
    "te",
}
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"

header_names = st.one_of(st.sampled_from(NAMES), st.text(TOKEN, min_size=1, max_size=20)).filter(
    lambda name: name.lower() not in LEFT_OUT
)
# Any byte a header value may hold on the wire: no CR, LF or NUL.
header_values = st.binary(max_size=80).map(
    lambda raw: raw.translate(None, b"\r\n\x00")
) | st.sampled_from(
    [
        b"Bearer " + KEY.encode(),
        b"Bearer \xff",
        b"multipart/form-data; boundary=x",
        b"multipart/form-data; boundary=" + b"b" * 80,
        b"multipart/form-data",
        b"gzip",
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        b"1e-400",
        b"\xc2\xb2",
    ]
)
query_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\u00b2", "1" * 5000, "5", "0", "-1", "1e3", " 3", "\u0663"]),
)
queries = st.lists(
    st.tuples(st.sampled_from(["top_k", "k", "top_k[]", ""]) | st.text(max_size=8), query_values),
    max_size=4,
).map(lambda pairs: urllib.parse.urlencode(pairs))
raw_queries = st.text(string.ascii_letters + string.digits + "%&=;+?/[]", max_size=30)


@pytest.fixture
def tracer_provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    yield provider
    provider.shutdown()


@pytest.fixture
async def client(app_client: AppClient) -> Any:
    return await app_client(auth={"api_keys": [KEY]})


async def assert_no_5xx(
    client: Any, method: str, target: str, headers: list[tuple[str | bytes, str | bytes]]
) -> None:
    sent = [*headers, ("Content-Length", "0")]
    response = await exchange(client.server.port, request_head(method, target, sent))
    assert response.status < 500, (response.status, response.body)
    if response.headers.get("content-type", "").startswith("application/json"):
        assert response.json()


# /predict thrice: its handler is the one that reads the query.
ROUTES = [("POST", "/predict")] * 3 + [("GET", path) for path in PATHS if path != "/predict"]


@pytest.mark.slow
@FUZZ
@given(route=st.sampled_from(ROUTES), query=queries | raw_queries)
async def test_no_query_string_makes_a_5xx(client: Any, route: tuple[str, str], query: str) -> None:
    method, path = route
    await assert_no_5xx(client, method, f"{path}?{query}", [("Authorization", f"Bearer {KEY}")])


# The bearer check reads Authorization whatever the route: sometimes the key, sometimes a
# Bearer with any bytes after it, sometimes any bytes at all.
authorizations = st.one_of(
    st.none(),
    st.just(b"Bearer " + KEY.encode()),
    header_values.map(lambda value: b"Bearer " + value),
    header_values,
)


@pytest.mark.slow
@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "OPTIONS"]),
    path=st.sampled_from(PATHS),
    authorization=authorizations,
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
)
async def test_no_header_makes_a_5xx(
    client: Any,
    method: str,
    path: str,
    authorization: bytes | None,
    headers: list[tuple[str | bytes, str | bytes]],
) -> None:
    if authorization is not None:  # first: of two, the first is the one read
        headers = [("Authorization", authorization), *headers]
    await assert_no_5xx(client, method, path, headers)


@pytest.mark.parametrize("header", ["baggage", "traceparent", "tracestate"])
@pytest.mark.parametrize("recorded", [False, True], ids=["default-tracing", "recorded-spans"])
async def test_a_propagation_header_that_is_not_utf8_is_no_5xx(
    app_client: AppClient, tracer_provider: TracerProvider, recorded: bool, header: str
) -> None:
    """OpenTelemetry's propagators raise on such a value; the server drops the header."""
    client = await app_client(tracer_provider=tracer_provider if recorded else None)
    head = request_head("GET", "/", [(header, b"\x80"), ("Content-Length", "0")])
    response = await exchange(client.server.port, head)
    assert response.status == 200, (response.status, response.body)
