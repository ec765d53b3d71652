"""Command line: load settings, build the app, serve until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import web

from . import __version__
from .core.errors import BatcherClosedError, ModelLoadError
from .core.readiness import ExitCode
from .http.app import create_app, create_metrics_app
from .http.appkeys import BATCHER, READINESS
from .models import compile_runner, load_runner, torchvision_classifier
from .models.loading import cache_root
from .observability.logs import configure_logging
from .settings import Settings, SettingsError, load_settings, settings_warnings

__all__ = ["compile_cache", "main", "serve"]

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


class _CannotListenError(Exception):
    """A host and port could not be bound; the message names the address and the fix."""


async def _listen(runner: web.AppRunner, host: str, port: int, *, section: str) -> None:
    """Start a TCP site, or raise ``_CannotListenError`` saying which setting to change."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fix = f"stop what uses it, or set {section}.port to a free port (0 picks one)"
        elif exc.errno == errno.EACCES:
            fix = f"ports below 1024 need privileges: set {section}.port to 1024 or above"
        else:  # not an address of this machine, or a name that does not resolve
            fix = f"set {section}.host to an address of this machine (0.0.0.0: all of them)"
        reason = exc.strerror or str(exc)
        raise _CannotListenError(f"cannot listen on {host}:{port} ({reason}): {fix}") from exc


def _force_stop(app: web.Application, sig: signal.Signals) -> None:
    """A second signal: fail what waits for the model now, and exit 128 + its number."""
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


async def serve(settings: Settings) -> int:
    """Serve until a signal, or until start-up fails; returns the exit status."""
    app = create_app(settings)
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
    await runner.setup()  # loads the model: a ModelLoadError surfaces here
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
    try:
        await _listen(runner, settings.server.host, settings.server.port, section="server")
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
            await _listen(metrics_runner, metrics_host, settings.metrics.port, section="metrics")
            log.info("metrics_listening", host=metrics_host, port=settings.metrics.port)
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
    return code


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def compile_cache(settings: Settings) -> int:
    """Build (or check) every compiled forward pass the settings need; the exit status."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``batching-server`` and ``python -m batching_server``."""
    args = _parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"batching-server: {exc}", file=sys.stderr)
        return ExitCode.BAD_SETTINGS
    configure_logging(level=settings.logging.level, fmt=settings.logging.format)
    log.info("starting", version=__version__, weights=settings.model.weights)
    for warning in settings_warnings(settings):
        log.warning("settings_warning", problem=warning)
    try:
        if args.command == "compile":
            return compile_cache(settings)
        code = asyncio.run(serve(settings))
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
