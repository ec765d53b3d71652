"""Ahead-of-time compiled forward passes: the cache key, model.compile's modes, the
``compile`` command and a start that loads what it built."""

from __future__ import annotations

import asyncio
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import batching_server.__main__ as cli
from batching_server import models
from batching_server.http.app import create_app
from batching_server.http.appkeys import METRICS, READINESS, RUNNER
from batching_server.models import RESNET50, aot, compile_runner, load_runner, loading
from batching_server.models.aot import GraphShape, graph_key, weights_identity
from batching_server.models.compile_cache import ARTIFACT, MANIFEST
from batching_server.settings import Settings
from tests.conftest import make_settings

INPUT = 16  # pixels a side: the tiny network compiles in a fraction of a ResNet's time


@dataclass(frozen=True)
class TinySpec:
    """A small conv net with batch norm (which freezing folds), as a ModelSpec."""

    name: str = "tiny"

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(f"class {i}" for i in range(10))

    @property
    def weight_names(self) -> tuple[str, ...]:
        return ()

    def input_size(self, weights: str) -> int:
        return INPUT

    def build(self, weights: str, *, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(8, 10),
            )

    def transform(self, weights: str) -> nn.Module:
        return RESNET50.transform("random")  # the app's decode pool wants one; nothing decodes


class CountingBuilds:
    """Counts (and passes on) calls to aot.build_package."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shapes: list[int] = []
        real = aot.build_package

        def build(module: nn.Module, example: torch.Tensor, **kwargs: Any) -> None:
            self.shapes.append(example.shape[0])
            real(module, example, **kwargs)

        monkeypatch.setattr(aot, "build_package", build)


def tiny_settings(cache: Path, **model: Any) -> Settings:
    return make_settings(
        model={"compile_cache_dir": str(cache), "channels_last": True, **model},
        # One graph: a shared pass on both cores (a lone image is padded to 2, so it gets
        # no solo graph of its own).
        batching={"max_batch_size": 2, "batch_sizes": [2], "max_concurrent_batches": 1},
    )


def test_the_key_covers_what_changes_the_code(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "model": "resnet18",
        "weights": weights_identity("random", 0),
        "precision": "fp32",
        "channels_last": True,
        "input_size": 224,
        "shape": GraphShape(1, 2),
        "device": aot.device_identity(torch.device("cpu")),
    }
    key = graph_key(**base)
    assert key["torch"] == torch.__version__
    changes = {
        "weights": weights_identity("random", 1),
        "precision": "bf16",
        "channels_last": False,
        "input_size": 256,
        "shape": GraphShape(1, 1),
        "model": "resnet50",
    }
    for field, value in changes.items():
        assert graph_key(**{**base, field: value}) != key, field
    assert graph_key(**{**base, "shape": GraphShape(2, 2)}) != key
    # A weights file counts by its content, not its name.
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights")
    second.write_bytes(b"weights")
    assert weights_identity(str(first), 0) == weights_identity(str(second), 0)
    second.write_bytes(b"other weights")
    assert weights_identity(str(first), 0) != weights_identity(str(second), 0)
    assert weights_identity("IMAGENET1K_V1", 0) != weights_identity("IMAGENET1K_V2", 0)


def test_a_package_that_is_not_one_does_not_load(tmp_path: Path) -> None:
    """So that the cache rejects it (and rebuilds) instead of serving garbage."""
    garbage = tmp_path / "model.pt2"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(Exception, match="zip"):
        aot.load_package(garbage, device=torch.device("cpu"), concurrent=1)


def test_auto_on_a_cpu_with_an_empty_cache_runs_eagerly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = CountingBuilds(monkeypatch)
    settings = tiny_settings(tmp_path / "cache", compile="auto")
    runner = load_runner(settings.model, batching=settings.batching, spec=TinySpec())
    with structlog.testing.capture_logs() as logs:
        assert not compile_runner(runner, settings.model, batching=settings.batching)
    runner.close()
    assert not runner.forward_pass.compiled
    assert builds.shapes == []
    [event] = [e for e in logs if e["event"] == "model_not_compiled"]
    assert "run `batching-server compile`" in event["reason"]


def test_false_never_looks_at_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("model.compile is false")

    monkeypatch.setattr(loading, "load_graphs", never)
    settings = tiny_settings(tmp_path / "cache", compile=False)  # a boolean still works
    runner = load_runner(settings.model, batching=settings.batching, spec=TinySpec())
    assert not compile_runner(runner, settings.model, batching=settings.batching)
    runner.close()
    assert not runner.forward_pass.compiled


@pytest.mark.slow
async def test_compile_builds_the_cache_and_a_start_loads_it(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``batching-server compile`` exits 0 having built every shape; a start with
    ``model.compile = auto`` then loads them without compiling, and serves what eager does."""
    builds = CountingBuilds(monkeypatch)
    monkeypatch.setattr(models, "torchvision_classifier", lambda name: TinySpec())
    cache = tmp_path / "cache"
    (tmp_path / "settings.toml").write_text(
        f"""
        [model]
        weights = "random"
        device = "cpu"
        precision = "fp32"
        compile = "auto"
        compile_cache_dir = "{cache}"
        [batching]
        max_batch_size = 2
        batch_sizes = [2]
        max_concurrent_batches = 1
        """
    )
    monkeypatch.setattr(cli, "configure_logging", lambda **kwargs: None)
    assert cli.main(["compile", "--settings", str(tmp_path / "settings.toml")]) == 0
    assert builds.shapes == [2]
    entries = [p for p in cache.iterdir() if (p / MANIFEST).is_file()]
    assert len(entries) == 1
    # Built frozen: batch norm folded into the convolution, run by oneDNN on pre-packed
    # weights (without freezing it is a plain aten convolution, as slow as eager).
    with zipfile.ZipFile(entries[0] / ARTIFACT) as package:
        [wrapper] = [n for n in package.namelist() if n.endswith("wrapper.cpp")]
        code = package.read(wrapper).decode()
    assert "convolution_pointwise" in code
    assert "batch_norm" not in code

    settings = tiny_settings(cache, compile="auto", precision="fp32")
    runner = load_runner(settings.model, batching=settings.batching, spec=TinySpec())
    try:
        with structlog.testing.capture_logs() as logs:
            assert compile_runner(runner, settings.model, batching=settings.batching)
        assert builds.shapes == [2]  # loaded, not built again
        assert runner.forward_pass.compiled
        assert [e["event"] for e in logs if e["event"].startswith("compiled_graph")] == [
            "compiled_graph_loaded"
        ]
        graphs = runner.forward_pass._run
        assert isinstance(graphs, aot.CompiledGraphs)
        batch = torch.randn(1, 3, INPUT, INPUT)
        with torch.inference_mode():
            eager = runner.forward_pass.module(batch.contiguous(memory_format=torch.channels_last))
        # A lone image, padded to the compiled shape of 2.
        torch.testing.assert_close(runner.forward(batch), torch.softmax(eager, dim=1))
        assert graphs.fallbacks == 0
        # A thread count no plan uses has no graph: it runs eagerly, and is counted.
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                got = runner.forward(batch, threads=1)
                torch.testing.assert_close(got, torch.softmax(eager, dim=1))
        assert graphs.fallbacks == 2
        [missing] = [e for e in logs if e["event"] == "compiled_graph_missing"]  # logged once
        assert (missing["batch_size"], missing["threads"]) == (2, 1)
    finally:
        runner.close()

    # A server's start loads them while warming up, and is ready with them.
    with structlog.testing.capture_logs() as logs:
        app = await ready_app(aiohttp_client, tiny_settings(cache, compile="auto", warmup=True))
    assert app[READINESS].ready
    assert app[RUNNER].forward_pass.compiled
    assert compiled_gauge(app) == 1
    assert builds.shapes == [2]
    assert [e["event"] for e in logs if e["event"].startswith("compiled_graph")] == [
        "compiled_graph_loaded"
    ]

    # Other weights are another key: that start compiles its own.
    settings = tiny_settings(cache, compile="auto", seed=7)
    runner = load_runner(settings.model, batching=settings.batching, spec=TinySpec())
    assert not compile_runner(runner, settings.model, batching=settings.batching)
    runner.close()
    assert not runner.forward_pass.compiled  # compile_runner never builds with auto on a CPU
    assert builds.shapes == [2]


def test_compile_refuses_without_a_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "settings.toml").write_text('[model]\nweights = "random"\ncompile_cache_dir = ""\n')
    monkeypatch.setattr(cli, "configure_logging", lambda **kwargs: None)
    with structlog.testing.capture_logs() as logs:
        code = cli.main(["compile", "--settings", str(tmp_path / "settings.toml")])
    assert code == 2
    assert any("model.compile_cache_dir is empty" in e.get("error", "") for e in logs)


def compiled_gauge(app: Any) -> float:
    """``model_compiled`` as a scrape of the app's /metrics reads it."""
    body, _ = app[METRICS].render([])
    [value] = [
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "model_compiled"
    ]
    return float(value)


async def ready_app(aiohttp_client: Any, settings: Settings, *, spec: Any = None) -> Any:
    """The app as a start makes it (it loads the model itself), once ready or failed."""
    app = create_app(settings, spec=spec or TinySpec())
    await aiohttp_client(app)
    readiness = app[READINESS]
    waits = {
        asyncio.create_task(readiness.wait_ready()),
        asyncio.create_task(readiness.wait_failed()),
    }
    _, pending = await asyncio.wait(waits, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return app


@pytest.mark.parametrize("mode", ["auto", "true"])
async def test_a_start_whose_compile_fails(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """auto serves eagerly (same answers, slower); true fails the start, as asked."""

    def fails(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(loading, "load_graphs", fails)
    settings = tiny_settings(tmp_path, compile=mode)
    # On a CPU, auto only loads; pretend a GPU so that it would build.
    monkeypatch.setattr(loading, "_builds_first", lambda settings, device: True)
    with structlog.testing.capture_logs() as logs:
        app = await ready_app(aiohttp_client, settings)
    assert any(e["event"] == "compile_failed" for e in logs)
    readiness = app[READINESS]
    if mode == "auto":
        assert readiness.ready
        assert not app[RUNNER].forward_pass.compiled
        assert compiled_gauge(app) == 0
    else:
        assert readiness.failed
        assert "compiling the model failed: RuntimeError" in readiness.reason
