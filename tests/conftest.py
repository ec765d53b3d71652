"""Shared fixtures: settings for tests, one loaded random ResNet-50, and a ready app client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from batching_server.grpc.server import add_grpc_server
from batching_server.http.app import create_app
from batching_server.http.appkeys import BATCHER, READINESS
from batching_server.models import ModelRunner, load_runner
from batching_server.settings import Settings, settings_from_mapping

AppClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def make_settings(**sections: dict[str, Any]) -> Settings:
    """Test settings: random weights, no warm-up, loopback; override per section."""
    raw: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0},
        # fp32 eager: exact comparisons against torchvision; fast paths have their own tests.
        "model": {
            "weights": "random",
            "warmup": False,
            "device": "cpu",
            "precision": "fp32",
            "channels_last": False,
            # Eager unless a test compiles: auto would load whatever this machine's cache holds.
            "compile": "false",
        },
        # One forward pass at a time: gated-model tests hold the only batch slot. How the
        # cores are shared out among several passes has its own tests (test_threads.py).
        "batching": {"max_batch_size": 8, "max_wait_ms": 5.0, "max_concurrent_batches": 1},
        # No gRPC port: tests run side by side, and 8001 may be taken (tests/grpc/ bind their
        # own, free one).
        "oip": {"grpc_port": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return settings_from_mapping(raw)


@pytest.fixture(scope="session")
def classifier() -> Iterator[ModelRunner]:
    """One seeded random ResNet-50 for the whole session (loading costs about a second)."""
    settings = make_settings()
    loaded = load_runner(settings.model, batching=settings.batching)
    yield loaded
    loaded.close()


@pytest.fixture
def app_client(aiohttp_client: Any, classifier: ModelRunner) -> Iterator[AppClient]:
    """Start the real app with the shared model and return a client once it is ready."""
    models: list[Any] = []

    async def start(
        settings: Settings | None = None,
        *,
        model: Any = None,
        tracer_provider: Any = None,
        grpc: bool = False,
        **sections: dict[str, Any],
    ) -> Any:
        models.append(model)
        app = create_app(
            settings or make_settings(**sections),
            runner=model or classifier,
            tracer_provider=tracer_provider,
        )
        if grpc:  # the gRPC endpoint too, on a free port: app[GRPC_SERVER].port
            add_grpc_server(app, port=0)
        client = await aiohttp_client(app)
        await app[READINESS].wait_ready()
        return client

    yield start
    # A test that failed while a gated fake held the model must not hang the app's shutdown.
    for model in models:
        gate = getattr(model, "gate", None)
        if gate is not None:
            gate.set()


async def saturate(
    app_client: AppClient,
    real: ModelRunner,
    jpeg_form: Any = None,
    send: Callable[[Any], Awaitable[Any]] | None = None,
    *,
    grpc: bool = False,
) -> Any:
    """A server whose model is held (gate closed) by one request and whose one queue slot
    is taken by a second; returns the client, the gated model and both pending requests.

    Each request posts ``jpeg_form()`` to /predict, or is ``send(client)``.
    """
    if send is None:

        def send(client: Any) -> Awaitable[Any]:
            return client.post("/predict", data=jpeg_form())

    from tests.fakes import SpyRunner

    spy = SpyRunner(real)
    spy.gate.clear()
    client = await app_client(
        model=spy,
        grpc=grpc,
        batching={"max_batch_size": 1, "max_queue_size": 1, "max_wait_ms": 0.0},
        limits={"max_files_per_request": 1},
    )
    running = asyncio.create_task(send(client))
    await spy.started.wait()  # the first request holds the model
    queued = asyncio.create_task(send(client))
    batcher = client.app[BATCHER]
    for _ in range(500):  # wait (bounded) until the second request fills the queue slot
        if batcher.queue_size:
            break
        await asyncio.sleep(0.01)
    assert batcher.queue_size == 1
    return client, spy, [running, queued]


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on, for as long as the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]
