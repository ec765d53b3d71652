"""Command line: load settings, build the app, serve until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import web

from . import __version__
from .core.errors import ModelLoadError
from .core.readiness import ExitCode
from .http.app import create_app, create_metrics_app
from .http.appkeys import READINESS
from .observability.logs import configure_logging
from .settings import Settings, SettingsError, load_settings

__all__ = ["main", "serve"]

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
    )
    await runner.setup()  # loads the model: a ModelLoadError surfaces here
    # The metrics port, if any, is cleaned up last, so the drain stays observable.
    metrics_runner: web.AppRunner | None = None
    try:
        site = web.TCPSite(runner, settings.server.host, settings.server.port)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info("listening", url=f"http://{host}:{port}", host=host, port=port)
        if settings.metrics.port:
            metrics_runner = web.AppRunner(create_metrics_app(app), access_log=None)
            await metrics_runner.setup()
            metrics_host = settings.metrics.host or settings.server.host
            await web.TCPSite(metrics_runner, metrics_host, settings.metrics.port).start()
            log.info("metrics_listening", host=metrics_host, port=settings.metrics.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        readiness = app[READINESS]
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(readiness.wait_failed())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        if readiness.failed:
            log.error("failed", reason=readiness.reason, exit_code=int(readiness.exit_code))
            return readiness.exit_code
        log.info("shutting_down", drain_timeout_s=settings.server.graceful_shutdown_timeout_s)
        return ExitCode.OK
    finally:
        app[READINESS].mark_not_ready("shutting down")
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        log.info("stopped")


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
    try:
        code = asyncio.run(serve(settings))
    except ModelLoadError as exc:
        log.error("model_load_failed", error=str(exc))
        return ExitCode.MODEL_LOAD_FAILED
    if code == ExitCode.MODEL_STALLED:
        # The stalled model thread never ends, and a normal exit joins every worker thread:
        # leave at once, after the log, instead of hanging until someone sends SIGKILL.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
