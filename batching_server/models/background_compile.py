"""``BackgroundCompile``: the compiled graphs a start found missing, built while the model
serves eagerly, then swapped in.

On a CPU a first compile takes minutes a shape, so ``model.compile = auto`` does not hold
readiness for it: the server is ready with the eager model, a low-priority child process
builds the missing graphs into the cache, and the forward pass switches to the compiled
graphs in one step once every one is loaded. The build runs in a process of its own, not a
thread, because export and code generation are Python work: in the server's interpreter they
would hold its lock against the event loop and the eager model for minutes. A failed build
leaves the eager model serving. Shutdown never waits for a build: the child is killed, and
the cache publishes an entry only once it is whole, so an interrupted build leaves no entry.

``python -m batching_server.models.background_compile`` is the child: it reads its job
(pickled, from its parent) on stdin.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from ..settings import BatchingSettings, ModelSettings
from .aot import GraphShape, graph_label, load_graphs
from .compile_cache import CompileCache
from .forward import ForwardPass
from .loading import builds_in_background, cache_root, graph_plan
from .runner import ModelRunner
from .spec import ModelSpec
from .threads import BUILD_NICENESS, lower_thread_priority

__all__ = ["BackgroundCompile", "BuildJob", "build_graphs"]

log = structlog.get_logger(__name__)

# How long abandon() waits for a killed build process to be gone: only a bound.
_REAP_S = 5.0


@dataclass(frozen=True, slots=True)
class BuildJob:
    """Everything the child needs to build the graphs the parent will load: the same network,
    and the parent's own shapes and keys (so the entries are exactly the ones it looks up)."""

    spec: ModelSpec
    settings: ModelSettings
    precision: str  # as the parent resolved it
    shapes: tuple[tuple[GraphShape, int], ...]
    keys: dict[GraphShape, dict[str, str]]
    input_size: int
    # The parent's logging set-up (it lives in observability, which models may not import).
    log_setup: Callable[[], None] | None = None


def build_graphs(job: BuildJob) -> None:
    """Build every graph of ``job`` missing from its cache, in the calling process."""
    root = cache_root(job.settings.compile_cache_dir)
    assert root is not None  # builds_in_background asks for a cache folder
    forward_pass = ForwardPass(
        module=job.spec.build(job.settings.weights, seed=job.settings.seed),
        device=torch.device("cpu"),
        precision=job.precision,
        channels_last=job.settings.channels_last,
    )

    def example(size: int) -> torch.Tensor:
        batch = torch.zeros(size, 3, job.input_size, job.input_size)
        return batch.contiguous(memory_format=forward_pass.memory_format)

    load_graphs(
        forward_pass.module,
        cache=CompileCache(root=root),
        shapes=job.shapes,
        key=job.keys.__getitem__,
        example=example,
        precision=forward_pass.precision,
        device=forward_pass.device,
        # Checked (manifest, checksum) but not loaded: the parent loads them, and each
        # loaded graph would hold another copy of the weights here.
        load=_not_loaded,
    )


def _not_loaded(package: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    def never(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{package} was built here, to be loaded by the server")

    return never


class BackgroundCompile:
    """Builds ``runner``'s missing graphs in a child process, at low priority, then runs them."""

    def __init__(
        self,
        *,
        runner: ModelRunner,
        spec: ModelSpec,
        settings: ModelSettings,
        batching: BatchingSettings,
        log_setup: Callable[[], None] | None = None,
        niceness: int = BUILD_NICENESS,
    ) -> None:
        self._runner = runner
        self._spec = spec
        self._settings = settings
        self._batching = batching
        self._log_setup = log_setup
        self._niceness = niceness
        self._abandoned = threading.Event()
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
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
        """Drop the build without waiting: the child (and its compilers) are killed, and
        nothing is swapped in. Safe to call whether or not it started."""
        with self._lock:
            self._abandoned.set()
            child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            # Reaped here (a killed process ends at once), so that none outlives the server,
            # not even as a zombie.
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=_REAP_S)

    def _run(self) -> None:
        try:
            # The child, and the compilers it starts, inherit this thread's nice value.
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
        runner = self._runner
        forward_pass = runner.forward_pass
        plan = graph_plan(runner, self._settings, self._batching)
        root = cache_root(self._settings.compile_cache_dir)
        assert root is not None  # builds_in_background asks for a cache folder
        cache = CompileCache(root=root)
        shapes = sorted(plan.shapes)
        keys = {shape: plan.key(shape) for shape, _ in shapes}
        missing = [
            graph_label(shape)
            for shape, _ in shapes
            if not cache.entry_path(graph_label(shape), keys[shape]).exists()
        ]
        log.info(
            "model_compiling_in_background",
            graphs=len(shapes),
            missing=missing,
            cache_dir=str(root),
            niceness=self._niceness,
        )
        job = BuildJob(
            spec=self._spec,
            settings=self._settings,
            precision=forward_pass.precision,
            shapes=tuple(shapes),
            keys=keys,
            input_size=runner.input_size,
            log_setup=self._log_setup,
        )
        self._build_elsewhere(job)
        if self._abandoned.is_set():
            log.info("model_compile_abandoned", reason="the server is shutting down")
            return
        # Everything is in the cache now: load it here, building nothing.
        graphs = plan.load(cache, allow_build=False)
        if graphs is None:
            raise RuntimeError("the build ended, but some compiled graph is not in the cache")
        # One swap: a pass in flight finishes on the eager model, the next runs compiled.
        forward_pass.use_compiled(graphs)
        log.info(
            "model_compiled",
            compile=self._settings.compile,
            reason="model.compile is auto on a CPU: built in the background",
            graphs=len(graphs.graphs),
            seconds=round(time.perf_counter() - started, 3),
        )

    def _build_elsewhere(self, job: BuildJob) -> None:
        """Run ``job`` in a child process; raises when it fails (not when abandoned)."""
        with self._lock:
            if self._abandoned.is_set():
                return
            # Its own process group, so that abandon() kills the compilers it starts too.
            self._child = subprocess.Popen(
                [sys.executable, "-m", __name__], stdin=subprocess.PIPE, start_new_session=True
            )
        child = self._child
        log.info("model_compile_process_started", pid=child.pid)
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # killed already: the code says so
            child.stdin.write(pickle.dumps(job))
            child.stdin.close()
        code = child.wait()
        if code != 0 and not self._abandoned.is_set():
            raise RuntimeError(f"the build process exited with status {code} (its log says why)")


def _main() -> int:
    job: BuildJob = pickle.load(sys.stdin.buffer)
    if job.log_setup is not None:
        job.log_setup()
    build_graphs(job)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
