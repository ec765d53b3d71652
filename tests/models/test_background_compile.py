"""``model.compile = auto`` on a CPU with graphs missing from the cache: ready at once on the
eager model, the graphs built in the background (gated here), then swapped in."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from torch import nn

from batching_server.http.app import create_app
from batching_server.http.appkeys import MODEL_COMPILE, READINESS, RUNNER
from batching_server.models import aot, background_compile
from batching_server.models.compile_cache import BUILD_LOCK
from batching_server.models.threads import thread_niceness
from tests.models.test_aot import INPUT, TinySpec, ready_app, tiny_settings

WAIT_S = 120  # only a bound against a hang: every wait ends on an event


class GatedBuilds:
    """A build held until ``release`` is set. ``then``: "child" holds the background build,
    then runs the real child process; otherwise builds run in this process (so that
    aot.build_package can be faked), each held, then "fail" fails, "stand-in" writes a
    package that ``aot.load_package`` loads as the eager module. ``niceness``: the building
    thread's nice value (a child and its compilers inherit it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, then: str) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.niceness: list[int] = []
        self.module: nn.Module | None = None
        self._then = then
        in_child = background_compile.BackgroundCompile._build_elsewhere

        def build_elsewhere(compiler: background_compile.BackgroundCompile, job: Any) -> None:
            if then == "child":
                self._hold()
                in_child(compiler, job)
            else:
                background_compile.build_graphs(job)

        monkeypatch.setattr(
            background_compile.BackgroundCompile, "_build_elsewhere", build_elsewhere
        )
        if then != "child":
            monkeypatch.setattr(aot, "build_package", self._build_package)
            monkeypatch.setattr(
                aot, "load_package", lambda path, *, device, concurrent: self.module
            )

    def _hold(self) -> None:
        self.niceness.append(thread_niceness())
        self.started.set()
        if not self.release.wait(WAIT_S):
            raise TimeoutError("the test never released the build")

    def _build_package(
        self, module: nn.Module, example: torch.Tensor, *, path: Path, **kwargs: Any
    ) -> None:
        self._hold()
        if self._then == "fail":
            raise RuntimeError("no C++ compiler")
        path.write_bytes(b"stand-in package")


async def wait(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_S)


@pytest.mark.slow
async def test_auto_on_a_cpu_is_ready_at_once_and_compiles_in_the_background(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = GatedBuilds(monkeypatch, then="child")
    cache = tmp_path / "cache"
    try:
        with structlog.testing.capture_logs() as logs:
            app = await ready_app(aiohttp_client, tiny_settings(cache, compile="auto"))
            readiness = app[READINESS]
            runner = app[RUNNER]
            # Ready on the eager model while the build is held.
            assert readiness.ready
            await wait(builds.started)
            assert not runner.forward_pass.compiled
            batch = torch.randn(1, 3, INPUT, INPUT)
            eager = runner.forward(batch)

            builds.release.set()
            await wait(app[MODEL_COMPILE].finished)
            assert runner.forward_pass.compiled
            assert isinstance(runner.forward_pass._run, aot.CompiledGraphs)
            torch.testing.assert_close(runner.forward(batch), eager)
            assert runner.forward_pass._run.fallbacks == 0
            assert readiness.ready
    finally:
        builds.release.set()
    # Built at the lowest priority: the child and its compilers inherit it.
    assert builds.niceness == [min(19, thread_niceness() + 19)]
    events = [e["event"] for e in logs]
    assert events.index("ready") < events.index("model_compiling_in_background")
    [started] = [e for e in logs if e["event"] == "model_compiling_in_background"]
    assert started["missing"] == ["b2-t2"]
    [compiled] = [e for e in logs if e["event"] == "model_compiled"]
    assert "background" in compiled["reason"]
    # Built by the child (its log lines are its own), loaded here: one whole entry, no
    # leftovers.
    assert not any(e.startswith("compiling_graph") for e in events)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == [BUILD_LOCK]
    assert len(list(cache.iterdir())) == 2


async def test_a_failed_background_build_keeps_serving_eagerly(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = GatedBuilds(monkeypatch, then="fail")
    builds.release.set()  # fails as soon as it starts
    with structlog.testing.capture_logs() as logs:
        app = await ready_app(aiohttp_client, tiny_settings(tmp_path / "cache", compile="auto"))
        await wait(app[MODEL_COMPILE].finished)
    assert builds.started.is_set()
    assert app[READINESS].ready
    assert not app[RUNNER].forward_pass.compiled
    [failed] = [e for e in logs if e["event"] == "compile_failed"]
    assert "background" in failed["reason"]
    assert "no C++ compiler" in failed["error"]
    assert not any(e["event"] == "model_compiled" for e in logs)


async def test_shutdown_does_not_wait_for_a_background_build(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = GatedBuilds(monkeypatch, then="stand-in")
    try:
        with structlog.testing.capture_logs() as logs:
            app = create_app(tiny_settings(tmp_path / "cache", compile="auto"), spec=TinySpec())
            client = await aiohttp_client(app)
            await app[READINESS].wait_ready()
            await wait(builds.started)
            # The whole cleanup (drain, model closed) while the build is still held.
            await client.close()
            background = app[MODEL_COMPILE]
            assert not background.finished.is_set()
            builds.module = app[RUNNER].forward_pass.module
            builds.release.set()
            await wait(background.finished)
    finally:
        builds.release.set()
    # Built and published (whole), but never swapped into a stopped server's model.
    assert not app[RUNNER].forward_pass.compiled
    assert any(e["event"] == "model_compile_abandoned" for e in logs)
    assert not any(e["event"] == "model_compiled" for e in logs)


async def test_true_is_ready_only_once_compiled(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = GatedBuilds(monkeypatch, then="stand-in")
    try:
        app = create_app(tiny_settings(tmp_path / "cache", compile="true"), spec=TinySpec())
        await aiohttp_client(app)
        readiness = app[READINESS]
        await wait(builds.started)
        assert not readiness.ready
        assert readiness.reason == "compiling the model"
        builds.module = app[RUNNER].forward_pass.module
        builds.release.set()
        await asyncio.wait_for(readiness.wait_ready(), WAIT_S)
    finally:
        builds.release.set()
    assert app[RUNNER].forward_pass.compiled
    assert builds.niceness == [thread_niceness()]  # compiled at the start's own priority
    assert not app[MODEL_COMPILE].start()  # nothing left to build
