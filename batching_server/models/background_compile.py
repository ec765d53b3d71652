"""``BackgroundCompile``: the compiled graphs a start found missing, built while the model
serves eagerly, then swapped in.

On a CPU a first compile takes minutes a shape, so ``model.compile = auto`` does not hold
readiness for it: the server is ready with the eager model, one low-priority daemon thread
builds the missing graphs into the cache, and the forward pass switches to the compiled
graphs in one step once every one is loaded. A failed build leaves the eager model serving.
Shutdown never waits for a build: the thread is a daemon, and the cache publishes an entry
only once it is whole, so an interrupted build leaves no entry behind.
"""

from __future__ import annotations

import threading
import time

import structlog

from ..settings import BatchingSettings, ModelSettings
from .aot import graph_label, load_graphs
from .compile_cache import CompileCache
from .loading import builds_in_background, cache_root, graph_plan
from .runner import ModelRunner
from .threads import BUILD_NICENESS, lower_thread_priority

__all__ = ["BackgroundCompile"]

log = structlog.get_logger(__name__)


class BackgroundCompile:
    """Builds ``runner``'s missing graphs in a daemon thread, at low priority, then runs them."""

    def __init__(
        self,
        *,
        runner: ModelRunner,
        settings: ModelSettings,
        batching: BatchingSettings,
        niceness: int = BUILD_NICENESS,
    ) -> None:
        self._runner = runner
        self._settings = settings
        self._batching = batching
        self._niceness = niceness
        self._abandoned = threading.Event()
        self._thread: threading.Thread | None = None
        # Set when the thread ends: compiled, failed or abandoned.
        self.finished = threading.Event()

    @property
    def wanted(self) -> bool:
        """Whether ``model.compile`` asks for a background build and the runner still runs
        eagerly (a start that loaded every graph has nothing left to build)."""
        forward_pass = self._runner.forward_pass
        return (
            builds_in_background(self._settings, forward_pass.device) and not forward_pass.compiled
        )

    @property
    def running(self) -> bool:
        """Whether the build thread has started and not ended."""
        return self._thread is not None and not self.finished.is_set()

    def start(self) -> bool:
        """Start the build when it is wanted; True when it started."""
        if self._thread is not None or not self.wanted:
            return False
        # A daemon thread, not an executor's: the interpreter joins an executor's threads at
        # exit, which would hold a stopping server for the rest of a build.
        self._thread = threading.Thread(target=self._run, name="model-compile", daemon=True)
        self._thread.start()
        return True

    def abandon(self) -> None:
        """Drop the build without waiting: a build in progress finishes (or dies with the
        process) unused. Safe to call whether or not it started."""
        self._abandoned.set()

    def _run(self) -> None:
        try:
            lower_thread_priority(self._niceness)
            self._build()
        except Exception as exc:
            # The eager model keeps serving the same answers: the server stays ready.
            log.exception(
                "compile_failed",
                reason="building the compiled model in the background",
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            self.finished.set()

    def _build(self) -> None:
        started = time.perf_counter()
        forward_pass = self._runner.forward_pass
        plan = graph_plan(self._runner, self._settings, self._batching)
        root = cache_root(self._settings.compile_cache_dir)
        if root is None:  # builds_in_background asks for one
            raise RuntimeError("model.compile_cache_dir is empty: nowhere to build into")
        cache = CompileCache(root=root)
        missing = [
            graph_label(shape)
            for shape, _ in sorted(plan.shapes)
            if not cache.entry_path(graph_label(shape), plan.key(shape)).exists()
        ]
        log.info(
            "model_compiling_in_background",
            graphs=len(plan.shapes),
            missing=missing,
            cache_dir=str(root),
            niceness=self._niceness,
        )
        # Loads the entries already there, builds the others (each logged as it goes).
        graphs = load_graphs(
            forward_pass.module,
            cache=cache,
            shapes=plan.shapes,
            key=plan.key,
            example=plan.example,
            precision=forward_pass.precision,
            device=forward_pass.device,
        )
        if graphs is None:  # only when building is not allowed; it is here
            raise RuntimeError("the compiled graphs could not be loaded")
        if self._abandoned.is_set():
            log.info("model_compile_abandoned", reason="the server is shutting down")
            return
        # One swap: a pass in flight finishes on the eager model, the next runs compiled.
        forward_pass.use_compiled(graphs)
        log.info(
            "model_compiled",
            compile=self._settings.compile,
            reason="model.compile is auto on a CPU: built in the background",
            graphs=len(graphs.graphs),
            seconds=round(time.perf_counter() - started, 3),
        )
