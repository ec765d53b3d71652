"""Shared fixtures: settings for tests, one loaded random ResNet-50, and a ready app client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from batching_server.app import create_app
from batching_server.appkeys import READINESS
from batching_server.model import Classifier, load_classifier
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
        },
        "batching": {"max_batch_size": 8, "max_wait_ms": 5.0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return settings_from_mapping(raw)


@pytest.fixture(scope="session")
def classifier() -> Iterator[Classifier]:
    """One seeded random ResNet-50 for the whole session (loading costs about a second)."""
    loaded = load_classifier(make_settings().model)
    yield loaded
    loaded.close()


@pytest.fixture
def app_client(aiohttp_client: Any, classifier: Classifier) -> AppClient:
    """Start the real app with the shared model and return a client once it is ready."""

    async def start(
        settings: Settings | None = None,
        *,
        model: Any = None,
        tracer_provider: Any = None,
        **sections: dict[str, Any],
    ) -> Any:
        app = create_app(
            settings or make_settings(**sections),
            classifier=model or classifier,
            tracer_provider=tracer_provider,
        )
        client = await aiohttp_client(app)
        await app[READINESS].wait_ready()
        return client

    return start
