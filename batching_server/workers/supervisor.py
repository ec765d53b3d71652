"""The parent of the worker processes: binds the port once, starts, watches and stops them.

It serves no request itself and never imports torch. Why an inherited socket rather than
SO_REUSEPORT: one bind, in one place, so a bad address fails once with exit 2 before any
worker starts, port 0 picks one port for all of them, no unrelated process can join the
port's group, and the listening socket (its backlog included) outlives a worker that dies,
so connections wait for the survivors instead of being refused.

gRPC (``oip.grpc_port``) cannot adopt an inherited socket, so there the workers bind the
port themselves with SO_REUSEPORT. The supervisor first reserves it: a bound socket with
SO_REUSEPORT that never listens (so it takes no connection) fails at once with exit 2 if
something else holds the port, and keeps any process without SO_REUSEPORT off the port
while workers come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass

import structlog
from aioprometheus.collectors import Registry

from .. import __version__
from ..__main__ import cannot_listen_message
from ..core.readiness import ExitCode
from ..observability.shared_metrics import (
    MetricFiles,
    SharedCounter,
    SharedGauge,
    forget_process,
)
from ..settings import Settings
from .assignment import WorkerAssignment, assign, visible_gpus
from .control import READY, fleet_message

__all__ = ["MAX_STARTUP_FAILURES", "AfterExit", "after_exit", "supervise"]

log = structlog.get_logger("batching_server.supervisor")

# A worker that exits before it is ready this many times in a row stops the server: it
# would only fail again (a missing checkpoint, a broken driver), and a restart loop hides it.
MAX_STARTUP_FAILURES = 3
# Exits before readiness that no retry can fix: the server stops at the first one.
_HOPELESS_AT_STARTUP = frozenset({ExitCode.BAD_SETTINGS, ExitCode.MODEL_LOAD_FAILED})
# After the drain's own timeout, how long workers get to exit (logs, span flush) before
# the supervisor kills them: no worker may outlive the supervisor.
EXIT_GRACE_S = 10.0
# Backlog of the shared listening socket (aiohttp's default for its own sites).
BACKLOG = 128


class AfterExit(enum.Enum):
    """What the supervisor does when a worker exits."""

    NOTHING = "nothing"  # the server is stopping: that exit was asked for
    REPLACE = "replace"  # it had served: start another in its place
    RETRY = "retry"  # it died warming up: try again, a few times
    STOP_SERVER = "stop_server"  # it keeps failing at start-up: stop, with its status


def after_exit(*, stopping: bool, was_ready: bool, code: int, startup_failures: int) -> AfterExit:
    """The rule; ``startup_failures`` counts this exit when it came before readiness."""
    if stopping:
        return AfterExit.NOTHING
    if was_ready:
        return AfterExit.REPLACE
    if code in _HOPELESS_AT_STARTUP or startup_failures >= MAX_STARTUP_FAILURES:
        return AfterExit.STOP_SERVER
    return AfterExit.RETRY


@dataclass(slots=True)
class _Slot:
    """One worker position: the process filling it now, and its start-up record."""

    assignment: WorkerAssignment
    process: asyncio.subprocess.Process | None = None
    control: asyncio.StreamWriter | None = None
    ready: bool = False
    startup_failures: int = 0
    last_exit: int | None = None


def _exit_code(returncode: int) -> int:
    # A worker killed by a signal: report it as a shell would (128 + its number).
    return returncode if returncode >= 0 else 128 - returncode


class _Supervisor:
    def __init__(
        self,
        *,
        settings: Settings,
        plan: list[WorkerAssignment],
        argv: list[str],
        api_socket: socket.socket,
        metrics_socket: socket.socket | None,
        grpc_port: int,
        metrics_dir: str,
    ) -> None:
        self._settings = settings
        self._slots = [_Slot(assignment) for assignment in plan]
        self._argv = argv
        self._api = api_socket
        self._metrics_socket = metrics_socket
        self._grpc_port = grpc_port
        self._metrics_dir = metrics_dir
        self._stopping = False
        self._signals = 0
        self._failure: int | None = None
        self._all_exited = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        files = MetricFiles(directory=metrics_dir, process_id="supervisor", worker_id="supervisor")
        registry = Registry()
        self._live = SharedGauge(
            "workers", "Worker processes alive now.", files=files, mode="livesum", registry=registry
        )
        self._restarts = SharedCounter(
            "worker_restarts_total",
            "Workers that died after start-up and were replaced.",
            files=files,
            registry=registry,
        )
        self._live.set({}, 0)
        self._restarts.set({}, 0)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            for slot in self._slots:
                await self._start(slot)
            await self._all_exited.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for task in self._tasks:
                task.cancel()
        if self._failure is not None:
            return self._failure
        return next((slot.last_exit for slot in self._slots if slot.last_exit), ExitCode.OK)

    def _command(self, slot: _Slot, control_fd: int) -> tuple[list[str], tuple[int, ...]]:
        assignment = slot.assignment
        fds = [self._api.fileno(), control_fd]
        command = [
            sys.executable,
            "-m",
            "batching_server.workers.worker",
            f"--index={assignment.index}",
            f"--cores={','.join(str(core) for core in assignment.cores)}",
            f"--listen-fd={self._api.fileno()}",
            f"--control-fd={control_fd}",
            f"--metrics-dir={self._metrics_dir}",
            f"--parent-pid={os.getpid()}",
        ]
        if self._metrics_socket is not None:
            command.append(f"--metrics-fd={self._metrics_socket.fileno()}")
            fds.append(self._metrics_socket.fileno())
        return [*command, "--", *self._argv], tuple(fds)

    async def _start(self, slot: _Slot) -> None:
        if self._stopping:  # the listening socket is closed: no replacement now
            return
        ours, theirs = socket.socketpair()
        command, fds = self._command(slot, theirs.fileno())
        env = dict(os.environ)
        if self._grpc_port:
            env["BATCHING_SERVER_OIP__GRPC_PORT"] = str(self._grpc_port)
        if slot.assignment.gpu is not None:
            # The worker sees its one GPU as cuda:0: model.device stays "auto" or "cuda",
            # and it creates no CUDA context on the others.
            env["CUDA_VISIBLE_DEVICES"] = slot.assignment.gpu
        try:
            # A session of its own: a terminal's Ctrl-C reaches the supervisor alone, which
            # forwards it once; otherwise each worker would get it twice (a forced stop).
            slot.process = await asyncio.create_subprocess_exec(
                *command, pass_fds=fds, env=env, start_new_session=True
            )
        finally:
            theirs.close()
        reader, slot.control = await asyncio.open_unix_connection(sock=ours)
        slot.ready = False
        log.info(
            "worker_warming",
            worker=slot.assignment.index,
            pid=slot.process.pid,
            cores=list(slot.assignment.cores),
            gpu=slot.assignment.gpu,
        )
        self._count_live()
        self._tell_the_fleet()
        task = asyncio.create_task(self._watch(slot, slot.process, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(
        self, slot: _Slot, process: asyncio.subprocess.Process, reader: asyncio.StreamReader
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                if line == READY and not slot.ready:
                    slot.ready = True
                    log.info("worker_ready", worker=slot.assignment.index, pid=process.pid)
                    self._tell_the_fleet()
        returncode = await process.wait()
        await self._on_exit(slot, _exit_code(returncode))

    def _fleet_state(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        for slot in self._slots:
            if not slot.ready:
                return False, f"worker {slot.assignment.index} is warming up"
        return True, "ready"

    def _tell_the_fleet(self) -> None:
        ready, reason = self._fleet_state()
        if ready:
            log.info("ready", workers=len(self._slots))
        message = fleet_message(ready=ready, reason=reason)
        for slot in self._slots:
            if slot.control is not None and not slot.control.is_closing():
                slot.control.write(message)

    def _count_live(self) -> None:
        live = sum(1 for slot in self._slots if slot.process and slot.process.returncode is None)
        self._live.set({}, live)

    async def _on_exit(self, slot: _Slot, code: int) -> None:
        index = slot.assignment.index
        slot.last_exit = code
        was_ready, slot.ready = slot.ready, False
        if slot.control is not None:
            slot.control.close()
            slot.control = None
        # Its gauges go (queue, in flight); its counters and histograms stay in the sums.
        forget_process(self._metrics_dir, str(index))
        self._count_live()
        if not was_ready and not self._stopping:
            slot.startup_failures += 1
        action = after_exit(
            stopping=self._stopping,
            was_ready=was_ready,
            code=code,
            startup_failures=slot.startup_failures,
        )
        if action is AfterExit.REPLACE:
            slot.startup_failures = 0
            self._restarts.inc({})
            log.error("worker_died", worker=index, exit_code=code, action="replacing it")
            await self._start(slot)
            return
        if action is AfterExit.RETRY:
            log.warning(
                "worker_died_at_startup",
                worker=index,
                exit_code=code,
                attempts=slot.startup_failures,
                max_attempts=MAX_STARTUP_FAILURES,
            )
            await self._start(slot)
            return
        if action is AfterExit.STOP_SERVER:
            log.error(
                "worker_failed_at_startup",
                worker=index,
                exit_code=code,
                attempts=slot.startup_failures,
                error=(
                    f"worker {index} exited with status {code} before it was ready "
                    f"({slot.startup_failures} time(s) in a row): the server stops; the "
                    "worker's own log lines above say why"
                ),
            )
            self._stop(failure=code or ExitCode.STARTUP_FAILED)
        else:
            log.info("worker_stopped", worker=index, exit_code=code)
        self._note_if_all_exited()

    def _note_if_all_exited(self) -> None:
        if all(s.process is None or s.process.returncode is not None for s in self._slots):
            self._all_exited.set()

    def _stop(self, *, failure: int | None = None, sig: signal.Signals = signal.SIGTERM) -> None:
        if failure is not None and self._failure is None:
            self._failure = failure
        if not self._stopping:
            self._stopping = True
            self._tell_the_fleet()
            # Replacements are over: the port closes with the last worker's site, as a
            # single process's would, instead of queueing connections nobody will accept.
            self._api.close()
            if self._metrics_socket is not None:
                self._metrics_socket.close()
            deadline = self._settings.server.graceful_shutdown_timeout_s + EXIT_GRACE_S
            task = asyncio.create_task(self._kill_after(deadline))
            self._tasks.add(task)
        for slot in self._slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(sig)
        self._note_if_all_exited()

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info(
                "shutting_down",
                signal=sig.name,
                drain_timeout_s=self._settings.server.graceful_shutdown_timeout_s,
            )
        else:  # each worker answers what waits for its model (503) and exits 128 + signal
            log.warning("forced_shutdown", signal=sig.name)
        self._stop(sig=sig)

    async def _kill_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        for slot in self._slots:
            if slot.process is not None and slot.process.returncode is None:
                log.error("worker_killed", worker=slot.assignment.index, waited_s=seconds)
                slot.process.kill()
                if self._failure is None:
                    self._failure = ExitCode.DRAIN_TIMED_OUT


def _bind(host: str, port: int, *, section: str) -> socket.socket:
    """A listening socket on ``host:port``; OSError's message names the fix."""
    return _socket(host, port, reuse=socket.SO_REUSEADDR, section=section)


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, never listening: the workers'
    gRPC servers join it with SO_REUSEPORT; OSError's message names the fix."""
    return _socket(host, port, reuse=socket.SO_REUSEPORT, section="oip", prefix="grpc_")


def _socket(host: str, port: int, *, reuse: int, section: str, prefix: str = "") -> socket.socket:
    # Listens unless it only reserves the port for the workers (SO_REUSEPORT).
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, reuse, 1)
            sock.bind(address)
            if reuse != socket.SO_REUSEPORT:
                sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        message = cannot_listen_message(exc, host, port, section=section, prefix=prefix)
        raise OSError(exc.errno, message) from exc
    return sock


def supervise(settings: Settings, *, workers: int, argv: list[str]) -> int:
    """Run ``workers`` worker processes on one port until a signal; returns the exit status."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    try:
        plan = assign(
            workers=workers, cores=cores or range(os.cpu_count() or 1), gpus=visible_gpus()
        )
    except ValueError as exc:
        print(f"batching-server: {exc}", file=sys.stderr)
        return ExitCode.BAD_SETTINGS
    log.info("starting", version=__version__, weights=settings.model.weights, workers=workers)
    server = settings.server
    metrics_port = settings.metrics.port
    bound: list[socket.socket] = []
    try:
        api = _bind(server.host, server.port, section="server")
        bound.append(api)
        metrics: socket.socket | None = None
        grpc: socket.socket | None = None
        if metrics_port:
            metrics_host = settings.metrics.host or server.host
            metrics = _bind(metrics_host, metrics_port, section="metrics")
            bound.append(metrics)
        if settings.oip.grpc_port:
            grpc = _reserve(settings.oip.grpc_host or server.host, settings.oip.grpc_port)
            bound.append(grpc)
    except OSError as exc:
        for sock in bound:
            sock.close()
        log.error("cannot_listen", error=exc.strerror)
        return ExitCode.BAD_SETTINGS
    host, port = api.getsockname()[:2]
    grpc_port = grpc.getsockname()[1] if grpc is not None else 0
    log.info(
        "listening",
        url=f"http://{host}:{port}",
        host=host,
        port=port,
        workers=workers,
        **({"grpc_port": grpc_port} if grpc_port else {}),
    )
    for assignment in plan:
        log.info(
            "worker_assignment",
            worker=assignment.index,
            cores=list(assignment.cores),
            torch_threads=settings.model.num_threads or assignment.threads,
            decode_threads=settings.preprocess.threads or assignment.threads,
            gpu=assignment.gpu,
        )
    metrics_dir = tempfile.mkdtemp(prefix="batching-server-metrics-")
    try:
        supervisor = _Supervisor(
            settings=settings,
            plan=plan,
            argv=argv,
            api_socket=api,
            metrics_socket=metrics,
            grpc_port=grpc_port,
            metrics_dir=metrics_dir,
        )
        code = asyncio.run(supervisor.run())
    finally:
        for sock in bound:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("stopped", exit_code=int(code))
    return code
