"""Command line: load settings, build the app, serve until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import structlog
from aiohttp import web

from . import __version__
from .core.errors import BatcherClosedError, ModelLoadError
from .core.fleet import WorkerRole
from .core.readiness import ExitCode, Readiness
from .observability.logs import configure_logging
from .settings import (
    Settings,
    SettingsError,
    check_model_catalogue,
    load_settings,
    settings_warnings,
    without_model_catalogue,
)

# The app (and with it torch) is imported where it is used: a supervisor of worker
# processes runs this module too, and stays light.

__all__ = ["WorkerRuntime", "cannot_listen_message", "compile_cache", "main", "serve"]

log = structlog.get_logger("batching_server")

DEFAULT_SETTINGS_FILE = Path("settings.toml")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="batching-server",
        description="ResNet-50 image classification over HTTP with dynamic batching.",
    )
    parser.add_argument(
        "--settings",
        type=Path,
        help="settings TOML file (default: ./settings.toml when it exists); "
        "BATCHING_SERVER_* environment variables override it",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("serve", "compile"),
        default="serve",
        help="serve (the default), or compile: build the compiled forward passes of these "
        "settings into model.compile_cache_dir, then exit",
    )
    parser.add_argument("--host", help="interface to bind (overrides server.host)")
    parser.add_argument("--port", type=int, help="TCP port (overrides server.port)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace) -> Settings:
    path = args.settings
    if path is None and DEFAULT_SETTINGS_FILE.is_file():
        path = DEFAULT_SETTINGS_FILE
    # The checks against torchvision's catalogue wait until this process is known to serve
    # (main calls check_model_catalogue): a supervisor of workers never imports torchvision.
    with without_model_catalogue():
        settings = load_settings(path)
        server = {}
        if args.host is not None:
            server["host"] = args.host
        if args.port is not None:
            server["port"] = args.port
        return settings.replace(server=server) if server else settings


# After a second signal, how long the responses of callers whose images just failed may take
# to go out: a few loop rounds each, so this is generous, yet prompt for an operator who
# asked twice.
FORCED_EXIT_GRACE_S = 1.0

# Exits that may leave a model thread running (a hung pass, or one the drain abandoned): a
# normal exit joins every worker thread, so these leave at once, after the logs.
_EXIT_AT_ONCE = frozenset(
    {
        ExitCode.MODEL_STALLED,
        ExitCode.DRAIN_TIMED_OUT,
        ExitCode.FORCED_BY_SIGINT,
        ExitCode.FORCED_BY_SIGTERM,
    }
)


class WorkerRuntime(Protocol):
    """What a worker process gets from its supervisor (see batching_server.workers)."""

    role: WorkerRole

    def listening_sockets(self) -> tuple[socket.socket, socket.socket | None]:
        """The API socket and the metrics socket (if metrics.port), bound by the supervisor."""

    async def report(self, readiness: Readiness, stop: Callable[[], None]) -> None:
        """Tell the supervisor when this worker is ready; keep the fleet's state current."""


class _CannotListenError(Exception):
    """A host and port could not be bound; the message names the address and the fix."""


def cannot_listen_message(
    exc: OSError, host: str, port: int, *, section: str, prefix: str = ""
) -> str:
    """Why ``host:port`` could not be bound, and which setting to change
    (``{section}.{prefix}port`` and ``{section}.{prefix}host``)."""
    port_key, host_key = f"{section}.{prefix}port", f"{section}.{prefix}host"
    if exc.errno == errno.EADDRINUSE:
        fix = f"stop what uses it, or set {port_key} to a free port (0 picks one)"
    elif exc.errno == errno.EACCES:
        fix = f"ports below 1024 need privileges: set {port_key} to 1024 or above"
    else:  # not an address of this machine, or a name that does not resolve
        fix = f"set {host_key} to an address of this machine (0.0.0.0: all of them)"
    reason = exc.strerror or str(exc)
    return f"cannot listen on {host}:{port} ({reason}): {fix}"


async def _listen(runner: web.AppRunner, host: str, port: int, *, section: str) -> None:
    """Start a TCP site, or raise ``_CannotListenError`` saying which setting to change."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        message = cannot_listen_message(exc, host, port, section=section)
        raise _CannotListenError(message) from exc


def _force_stop(app: web.Application, sig: signal.Signals) -> None:
    """A second signal: fail what waits for the model now, and exit 128 + its number."""
    from .http.appkeys import BATCHER, READINESS

    code = ExitCode.FORCED_BY_SIGINT if sig == signal.SIGINT else ExitCode.FORCED_BY_SIGTERM
    log.warning("forced_shutdown", signal=sig.name, exit_code=int(code))
    app[READINESS].mark_failed(f"stopped at once by a second {sig.name}", exit_code=code)
    batcher = app.get(BATCHER)
    if batcher is not None:
        batcher.abort(
            lambda: BatcherClosedError(
                f"a second {sig.name} stopped the server before this image was served"
            )
        )


async def _shut_down(runner: web.AppRunner, forced: asyncio.Event) -> bool:
    """Drain and clean up; after a second signal, stop waiting. True if cleanup finished."""
    cleanup = asyncio.create_task(runner.cleanup(), name="shutdown")
    force = asyncio.create_task(forced.wait())
    await asyncio.wait({cleanup, force}, return_when=asyncio.FIRST_COMPLETED)
    force.cancel()
    if not cleanup.done():
        # Callers waiting for the model were just answered (503); uploads still arriving
        # and everything after the drain (the model threads, the span flush) are given up.
        await asyncio.wait({cleanup}, timeout=FORCED_EXIT_GRACE_S)
        if not cleanup.done():
            cleanup.cancel()
            return False
    cleanup.result()  # an error in a cleanup step is not to pass unseen
    return True


async def serve(settings: Settings, *, worker: WorkerRuntime | None = None) -> int:
    """Serve until a signal, or until start-up fails; returns the exit status.

    A ``worker`` serves on the sockets its supervisor bound, and reports to it.
    """
    from .grpc.server import GrpcListenError, add_grpc_server
    from .http.app import create_app, create_metrics_app
    from .http.appkeys import MODEL_COMPILE, READINESS

    app = create_app(settings, worker=worker.role if worker is not None else None)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.server.graceful_shutdown_timeout_s,
        # A client that disconnects cancels its handler, which withdraws its queued images
        # before they cost a forward pass (aiohttp leaves this off by default).
        handler_cancellation=True,
        # A hand-built AppRunner keeps idle connections for about an hour; see the setting.
        keepalive_timeout=settings.server.keepalive_timeout_s,
    )
    if settings.oip.grpc_port:
        add_grpc_server(app)
    try:
        await runner.setup()  # loads the model: a ModelLoadError surfaces here
    except GrpcListenError as exc:
        log.error("cannot_listen", error=str(exc))
        await runner.cleanup()  # what setup started (the model threads, the pools)
        log.info("stopped", exit_code=int(ExitCode.BAD_SETTINGS))
        return ExitCode.BAD_SETTINGS
    readiness = app[READINESS]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    forced = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()  # the first one: drain
        elif not forced.is_set():
            forced.set()
            _force_stop(app, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    # The metrics port, if any, is cleaned up last, so the drain stays observable.
    metrics_runner: web.AppRunner | None = None
    code: int | None = None
    reporter: asyncio.Task[None] | None = None
    try:
        if worker is None:
            await _listen(runner, settings.server.host, settings.server.port, section="server")
        else:
            await web.SockSite(runner, worker.listening_sockets()[0]).start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info("listening", url=f"http://{host}:{port}", host=host, port=port)
        if settings.metrics.port:
            metrics_runner = web.AppRunner(
                create_metrics_app(app),
                access_log=None,
                keepalive_timeout=settings.server.keepalive_timeout_s,
            )
            await metrics_runner.setup()
            metrics_host = settings.metrics.host or settings.server.host
            metrics_socket = worker.listening_sockets()[1] if worker is not None else None
            if metrics_socket is None:
                await _listen(
                    metrics_runner, metrics_host, settings.metrics.port, section="metrics"
                )
            else:
                await web.SockSite(metrics_runner, metrics_socket).start()
            log.info("metrics_listening", host=metrics_host, port=settings.metrics.port)
        if worker is not None:
            reporter = asyncio.create_task(worker.report(readiness, stop.set), name="report")
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(readiness.wait_failed())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        if readiness.failed:
            log.error("failed", reason=readiness.reason, exit_code=int(readiness.exit_code))
        else:
            drain_s = settings.server.graceful_shutdown_timeout_s
            log.info("shutting_down", drain_timeout_s=drain_s)
    except _CannotListenError as exc:
        log.error("cannot_listen", error=str(exc))
        code = ExitCode.BAD_SETTINGS
    finally:
        if reporter is not None:
            reporter.cancel()
        readiness.mark_not_ready("shutting down")
        finished = await _shut_down(runner, forced)
        if metrics_runner is not None and finished:
            await metrics_runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # a third signal kills at once, as by default
    if code is None:
        # Read after the drain: a stall found during it, a drain that ran out of time or a
        # second signal decides the status too.
        code = readiness.exit_code if readiness.failed else ExitCode.OK
    log.info("stopped", exit_code=int(code))
    if not finished:
        # The cleanup was given up: whatever it still waits for (a hung model thread, a
        # span export) would hold asyncio.run's own teardown too.
        _exit_now(code)
    if (background := app.get(MODEL_COMPILE)) is not None and background.running:
        # Its thread may be inside torch (loading what the build process built), and the
        # interpreter's teardown with a thread inside torch's C++ code can abort ("terminate
        # called without an active exception", status 134 instead of the drain's).
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def compile_cache(settings: Settings) -> int:
    """Build (or check) every compiled forward pass the settings need; the exit status."""
    from .models import compile_runner, load_runner, torchvision_classifier
    from .models.loading import cache_root

    if not settings.model.compile_cache_dir:
        log.error(
            "compile_needs_a_cache",
            error="model.compile_cache_dir is empty, so nothing compiled would be kept: "
            "set it to a folder, or to 'default'",
        )
        return ExitCode.BAD_SETTINGS
    # Built as a start with model.compile = true would build them, so that a start with
    # these settings (compile true or auto) loads every one.
    settings = settings.replace(model={"compile": "true"})
    runner = load_runner(
        settings.model,
        batching=settings.batching,
        spec=torchvision_classifier(settings.model.name),
    )
    try:
        compile_runner(runner, settings.model, batching=settings.batching)
    finally:
        runner.close()
    log.info("compile_cache_ready", cache_dir=str(cache_root(settings.model.compile_cache_dir)))
    return ExitCode.OK


def main(argv: Sequence[str] | None = None, *, worker: WorkerRuntime | None = None) -> int:
    """Entry point of ``batching-server`` and ``python -m batching_server``.

    With ``server.workers`` above 1 this process becomes the workers' supervisor; each
    worker runs this again with ``worker`` set (batching_server.workers.worker).
    """
    args = _parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"batching-server: {exc}", file=sys.stderr)
        return ExitCode.BAD_SETTINGS
    configure_logging(
        level=settings.logging.level,
        fmt=settings.logging.format,
        fields={"worker": worker.role.index} if worker is not None else None,
    )
    if worker is None and args.command != "compile" and settings.server.workers != 1:
        from .workers.assignment import worker_count

        count = worker_count(settings.server.workers)
        if count > 1:
            from .workers.supervisor import supervise

            given = list(argv) if argv is not None else sys.argv[1:]
            return supervise(settings, workers=count, argv=given)
    try:
        check_model_catalogue(settings)
    except SettingsError as exc:
        print(f"batching-server: {exc}", file=sys.stderr)
        return ExitCode.BAD_SETTINGS
    log.info("starting", version=__version__, weights=settings.model.weights)
    for warning in settings_warnings(settings):
        log.warning("settings_warning", problem=warning)
    try:
        if args.command == "compile":
            return compile_cache(settings)
        code = asyncio.run(serve(settings, worker=worker))
    except ModelLoadError as exc:
        log.error("model_load_failed", error=str(exc))
        return ExitCode.MODEL_LOAD_FAILED
    if code in _EXIT_AT_ONCE:
        # A model thread may never end, and a normal exit joins every worker thread: leave
        # at once, after the log, instead of hanging until someone sends SIGKILL.
        _exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
