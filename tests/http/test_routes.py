"""Routes declare their policy where they are defined; auth, tracing and ``/`` read it.

Deny by default: with ``auth.api_keys`` set, a route that does not say it is public, and a
request that matches no route, need a key.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from batching_server.http.app import create_app
from batching_server.http.appkeys import READINESS
from batching_server.http.routes import ROUTES, RouteTable, add_routes
from batching_server.models import ModelRunner
from tests.conftest import AppClient, make_settings

KEY = "k" * 20
AUTH = {"Authorization": f"Bearer {KEY}"}


async def _extra(request: web.Request) -> web.Response:
    return web.Response(text="extra")


def test_a_route_is_protected_and_traced_unless_it_says_otherwise() -> None:
    table = RouteTable()
    table.get("/plain", summary="plain")(_extra)
    table.post("/open", summary="open", public=True, traced=False)(_extra)
    plain, open_ = list(table)
    assert (plain.method, plain.path, plain.public, plain.traced) == ("GET", "/plain", False, True)
    assert (open_.method, open_.name, open_.public, open_.traced) == (
        "POST",
        "POST /open",
        True,
        False,
    )


async def test_public_routes_need_no_key_and_the_rest_do(app_client: AppClient) -> None:
    client = await app_client(auth={"api_keys": [KEY]})
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path)).status == 200, path
    assert (await client.post("/predict")).status == 401
    # The summary describes the model and the limits: a caller needs a key to read it.
    assert (await client.get("/")).status == 401
    assert (await client.get("/", headers=AUTH)).status == 200
    # A request that matches no route tells a caller without a key nothing, not even 404.
    for method, path in (("GET", "/no-such-route"), ("GET", "/predict"), ("DELETE", "/health")):
        response = await client.request(method, path)
        assert response.status == 401, (method, path)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await client.get("/no-such-route", headers=AUTH)).status == 404
    assert (await client.get("/predict", headers=AUTH)).status == 405


async def test_a_new_route_that_declares_nothing_is_protected(
    aiohttp_client: Any, classifier: ModelRunner
) -> None:
    app = create_app(make_settings(auth={"api_keys": [KEY]}), runner=classifier)
    table = RouteTable()
    table.get("/extra", summary="an endpoint someone added")(_extra)
    add_routes(app, table)
    client = await aiohttp_client(app)
    await app[READINESS].wait_ready()
    assert (await client.get("/extra")).status == 401
    response = await client.get("/extra", headers=AUTH)
    assert (response.status, await response.text()) == (200, "extra")


async def test_every_registered_route_is_declared_and_listed_on_the_index(
    app_client: AppClient,
) -> None:
    client = await app_client()
    declared = client.app[ROUTES]
    for route in client.app.router.routes():
        assert route in declared, f"{route.method} {route.resource} declares no policy"
    index = await (await client.get("/")).json()
    assert index["endpoints"] == {r.name: r.summary for r in declared.values()}
    assert set(index["endpoints"]) == {
        "POST /predict",
        "GET /health",
        "GET /ready",
        "GET /metrics",
        "GET /",
        "GET /v2",
        "GET /v2/health/live",
        "GET /v2/health/ready",
        "GET /v2/models/{model}",
        "GET /v2/models/{model}/versions/{version}",
        "GET /v2/models/{model}/ready",
        "GET /v2/models/{model}/versions/{version}/ready",
        "GET /v2/models/{model}/config",
        "GET /v2/models/{model}/versions/{version}/config",
        "POST /v2/models/{model}/infer",
        "POST /v2/models/{model}/versions/{version}/infer",
    }


async def test_tracing_follows_each_routes_declaration(
    aiohttp_client: Any, classifier: ModelRunner
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = make_settings(tracing={"excluded_paths": ["/also-quiet"]})
    app = create_app(settings, runner=classifier, tracer_provider=provider)
    table = RouteTable()
    table.get("/traced", summary="traced by default")(_extra)
    table.get("/quiet", summary="declares no span", traced=False)(_extra)
    table.get("/also-quiet", summary="excluded by tracing.excluded_paths")(_extra)
    add_routes(app, table)
    client = await aiohttp_client(app)
    await app[READINESS].wait_ready()
    try:
        for path in ("/traced", "/quiet", "/also-quiet", "/health", "/"):
            assert (await client.get(path)).status == 200
        names = sorted(s.name for s in exporter.get_finished_spans())
        assert names == ["GET /", "GET /traced"]
    finally:
        provider.shutdown()
