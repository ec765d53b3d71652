"""A worker's entry point: ``python -m batching_server.workers.worker ... -- <server args>``.

The supervisor starts each worker as a fresh interpreter (never a fork of a process that
has torch's threads), with the listening sockets and its end of a control socket pair as
inherited file descriptors. The worker pins itself to its cores before torch starts any
thread, so torch's and the decode pool's thread counts (one per available core) follow,
then runs the ordinary server with those sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

import structlog

from ..__main__ import main as server_main
from ..core.fleet import WorkerRole
from ..core.readiness import Readiness
from .control import READY, parse_fleet_message

__all__ = ["main"]

log = structlog.get_logger("batching_server.worker")

_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="batching_server.workers.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--cores", required=True, help="comma-separated core numbers")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--metrics-fd", type=int)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--metrics-dir", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("server_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    server_args = list(args.server_args)
    if server_args[:1] == ["--"]:
        server_args = server_args[1:]
    return args, server_args


def _exit_with_parent(parent_pid: int) -> bool:
    """Ask the kernel for SIGTERM when the supervisor dies, even by SIGKILL (Linux).

    SIGTERM, not SIGKILL: the worker then drains what it accepted, as on any SIGTERM.
    Returns False where prctl is unavailable (the control socket's end of file is then
    the signal).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The supervisor may have died before the call: then nothing would ever signal us.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class _Runtime:
    """The sockets and the control channel the supervisor gave this worker."""

    def __init__(
        self,
        *,
        role: WorkerRole,
        listen_fd: int,
        metrics_fd: int | None,
        control_fd: int,
        signalled_on_parent_death: bool,
    ) -> None:
        self.role = role
        self._api = socket.socket(fileno=listen_fd)
        self._metrics = socket.socket(fileno=metrics_fd) if metrics_fd is not None else None
        self._control = socket.socket(fileno=control_fd)
        self._signalled = signalled_on_parent_death

    def listening_sockets(self) -> tuple[socket.socket, socket.socket | None]:
        return self._api, self._metrics

    async def report(self, readiness: Readiness, stop: Callable[[], None]) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=self._control)

        async def say_ready() -> None:
            await readiness.wait_ready()
            writer.write(READY)
            await writer.drain()

        announcing = asyncio.create_task(say_ready(), name="say-ready")
        try:
            while line := await reader.readline():
                fleet = parse_fleet_message(line)
                if fleet is not None:
                    ready, reason = fleet
                    self.role.fleet.update(ready=ready, reason=reason)
            log.warning("supervisor_gone")
            self.role.fleet.update(ready=False, reason="the supervisor is gone")
            if not self._signalled:
                stop()  # else the kernel's SIGTERM (PR_SET_PDEATHSIG) starts the drain
        finally:
            announcing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announcing
            writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker: pin to its cores, then serve on the inherited sockets."""
    args, server_args = _parse_args(sys.argv[1:] if argv is None else argv)
    signalled = _exit_with_parent(args.parent_pid)
    cores = {int(core) for core in args.cores.split(",")}
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    runtime = _Runtime(
        role=WorkerRole(index=args.index, metrics_dir=args.metrics_dir),
        listen_fd=args.listen_fd,
        metrics_fd=args.metrics_fd,
        control_fd=args.control_fd,
        signalled_on_parent_death=signalled,
    )
    return server_main(server_args, worker=runtime)


if __name__ == "__main__":
    sys.exit(main())
