"""``python -m batching_server`` as a real process: exit codes, logs, and one real serve."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from batching_server import __version__
from tests.conftest import taken_port
from tests.images import photo_bytes

TIMEOUT_S = 60
TRITON_GRPC_CLIENT = Path(__file__).resolve().parent / "grpc" / "triton_grpc_client.py"


def cli_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The test's environment without stray BATCHING_SERVER_* variables, plus ``variables``.

    TORCH_HOME is empty and every download goes to a closed port, so no run can fetch weights.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHING_SERVER")}
    torch_home = tmp_path / "torch-home"
    torch_home.mkdir(exist_ok=True)
    env |= {
        "TORCH_HOME": str(torch_home),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "no_proxy": "",
        "PYTHONUNBUFFERED": "1",
        # No gRPC port unless a test asks: servers run side by side, and 8001 may be taken.
        "BATCHING_SERVER_OIP__GRPC_PORT": "0",
        # Eager unless a test compiles: auto would load whatever this machine's cache holds.
        "BATCHING_SERVER_MODEL__COMPILE": "false",
    }
    return env | {f"BATCHING_SERVER_{k}": v for k, v in variables.items()}


def run_cli(tmp_path: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion in ``tmp_path`` (so the repo's settings.toml is not read)."""
    return subprocess.run(
        [sys.executable, "-m", "batching_server", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path, **variables),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line, each of which must be one JSON object."""
    lines = stdout.splitlines()
    assert [line for line in lines if not (line.startswith("{") and line.endswith("}"))] == []
    return [json.loads(line) for line in lines]


def multipart(data: bytes, filename: str = "photo.jpg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def test_version(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"batching-server {__version__}"


def test_bad_settings_exit_2_listing_every_problem(tmp_path: Path) -> None:
    result = run_cli(tmp_path, SERVER__PORT="abc", LOGGING__FORMAT="yaml")
    assert result.returncode == 2
    assert "invalid settings (2 problems)" in result.stderr
    assert "server.port must be an integer from 0 to 65535, got 'abc'" in result.stderr
    assert "logging.format must be one of 'json', 'text', got 'yaml'" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "files", "message"),
    [
        pytest.param(
            ["--settings", "missing.toml"], {}, "'missing.toml' does not exist", id="missing"
        ),
        pytest.param(
            [],
            {"settings.toml": "[batching]\nmax_wait_ms = -1\n"},
            "batching.max_wait_ms must be a number from 0 to 10000, got -1",
            id="cwd-settings-toml",
        ),
        pytest.param(
            ["--settings", "other.toml"],
            {
                "settings.toml": "[logging]\nformat = 'yaml'\n",
                "other.toml": "[server]\nport = 'x'\n",
            },
            "server.port must be an integer from 0 to 65535, got 'x'",
            id="explicit-file-replaces-cwd",
        ),
        pytest.param(
            ["--port", "70000"],
            {},
            "server.port must be an integer from 0 to 65535, got 70000",
            id="port-flag",
        ),
        pytest.param(["--host", "my host"], {}, "server.host must be a host name", id="host-flag"),
    ],
)
def test_settings_problems_exit_2(
    tmp_path: Path, args: list[str], files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = run_cli(tmp_path, *args)
    assert result.returncode == 2
    assert "invalid settings (1 problem):" in result.stderr
    assert message in result.stderr
    assert result.stdout == ""


@pytest.fixture(scope="module")
def offline_named_weights(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One run with IMAGENET1K_V2, no cached weights and no network."""
    tmp_path = tmp_path_factory.mktemp("offline")
    return tmp_path, run_cli(tmp_path, "--port", "0", MODEL__WEIGHTS="IMAGENET1K_V2")


def test_named_weights_offline_exit_3_naming_the_fix(
    offline_named_weights: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    tmp_path, result = offline_named_weights
    assert result.returncode == 3
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["starting", "model_load_failed"]
    assert events[0]["weights"] == "IMAGENET1K_V2"
    failed = events[1]
    assert failed["level"] == "error"
    assert "IMAGENET1K_V2" in failed["error"]
    assert "'random'" in failed["error"]
    assert "state_dict" in failed["error"]
    assert str(tmp_path / "torch-home") in failed["error"]


def test_failed_download_keeps_stdout_json_only(
    offline_named_weights: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """torch.hub prints 'Downloading: ...' to stdout; a JSON log stream must not carry it."""
    _, result = offline_named_weights
    assert [e["event"] for e in json_lines(result.stdout)] == ["starting", "model_load_failed"]


class ServerProcess:
    """A real server whose stdout lines are read by a thread, so every wait is bounded."""

    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        program: Sequence[str] = ("-m", "batching_server"),
        **variables: str,
    ) -> None:
        self.stderr = (tmp_path / "stderr.txt").open("w")
        self.process = subprocess.Popen(
            [sys.executable, *program, *args],
            cwd=tmp_path,
            env=cli_env(tmp_path, **variables),
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, event: str) -> tuple[dict[str, Any], list[str]]:
        """The first log line with ``event``, and every line read up to it."""
        seen: list[str] = []
        while True:
            line = self.lines.get(timeout=TIMEOUT_S)
            assert line is not None, f"the server exited before {event!r}: {seen}"
            seen.append(line)
            if json.loads(line)["event"] == event:
                return json.loads(line), seen

    def rest(self) -> list[str]:
        """Lines after the process has exited and its stdout is closed."""
        self.reader.join(TIMEOUT_S)
        lines = []
        while (line := self.lines.get_nowait()) is not None:
            lines.append(line)
        return lines

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT_S)
        self.reader.join(TIMEOUT_S)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.stderr.close()


def get(url: str | urllib.request.Request, timeout_s: float = 10) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a request, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def wait_until_ready(base: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_S
    status, body = get(f"{base}/ready")
    while status != 200 and time.monotonic() < deadline:
        assert status == 503
        time.sleep(0.1)
        status, body = get(f"{base}/ready")
    assert status == 200, body
    return body


def serve_random(
    tmp_path: Path, program: Sequence[str] = ("-m", "batching_server"), **variables: str
) -> ServerProcess:
    """A real server on a free loopback port, with random weights."""
    return ServerProcess(
        tmp_path,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        program=program,
        MODEL__WEIGHTS="random",
        **variables,
    )


@pytest.mark.slow
def test_serve_predict_and_stop_on_sigterm(tmp_path: Path) -> None:
    server = serve_random(tmp_path, MODEL__WARMUP="true", BATCHING__MAX_BATCH_SIZE="2")
    try:
        listening, lines = server.wait_for("listening")
        assert listening["host"] == "127.0.0.1"
        assert listening["port"] > 0
        base = f"http://127.0.0.1:{listening['port']}"
        assert wait_until_ready(base)["model_loaded"] is True

        body, content_type = multipart(photo_bytes("chelsea.png"))
        request = urllib.request.Request(
            f"{base}/predict",
            data=body,
            headers={"Content-Type": content_type, "X-Request-ID": "cli-test-1"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            assert response.status == 200
            assert response.headers["X-Request-ID"] == "cli-test-1"
            result = json.load(response)
        assert isinstance(result["prediction"], str)
        assert result["prediction"]
        assert isinstance(result["confidence"], float)
        assert 0.0 <= result["confidence"] <= 1.0
        assert result["request_id"] == "cli-test-1"

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        lines += server.rest()
    finally:
        server.close()

    events = json_lines("".join(lines))
    names = [event["event"] for event in events]
    assert names[0] == "starting"
    assert names[-2:] == ["shutting_down", "stopped"]
    assert {"warmup_done", "ready", "request_completed"} <= set(names)
    assert next(e for e in events if e["event"] == "warmup_done")["batch_sizes"] == 2
    completed = next(e for e in events if e.get("route") == "/predict")
    assert completed["event"] == "request_completed"
    assert completed["request_id"] == "cli-test-1"
    assert completed["status"] == 200


@pytest.mark.slow
def test_a_real_server_serves_tritonclient_grpc_and_drains(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        grpc_port = probe.getsockname()[1]
    image = tmp_path / "cat.jpg"
    image.write_bytes(photo_bytes("chelsea.png"))
    server = serve_random(tmp_path, MODEL__WARMUP="false", OIP__GRPC_PORT=str(grpc_port))
    try:
        grpc_listening, lines = server.wait_for("grpc_listening")
        assert (grpc_listening["host"], grpc_listening["port"]) == ("127.0.0.1", grpc_port)
        listening, more = server.wait_for("listening")
        lines += more
        wait_until_ready(f"http://127.0.0.1:{listening['port']}")
        # tritonclient.grpc in a process of its own (see tests/grpc/triton_grpc_client.py).
        arguments = {"url": f"127.0.0.1:{grpc_port}", "scenario": "one", "images": [str(image)]}
        client = subprocess.run(
            [sys.executable, str(TRITON_GRPC_CLIENT), json.dumps(arguments)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=True,
        )
        assert json.loads(client.stdout) == {"failure": None}
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        lines += server.rest()
    finally:
        server.close()
    events = json_lines("".join(lines))
    (call,) = [e for e in events if e.get("route") == "/inference.GRPCInferenceService/ModelInfer"]
    assert (call["event"], call["grpc_status"], call["images"]) == ("request_completed", "OK", 1)
    assert [e["event"] for e in events][-2:] == ["shutting_down", "stopped"]


def in_flight(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("http_requests_in_flight "):
                return float(line.split()[1])
    raise AssertionError("http_requests_in_flight is missing from /metrics")


def post_photo(base: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(
        f"{base}/predict", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return int(response.status)


@pytest.mark.slow
def test_sigterm_mid_burst_answers_every_accepted_request(tmp_path: Path) -> None:
    burst = 12
    server = serve_random(
        tmp_path, MODEL__WARMUP="false", BATCHING__MAX_BATCH_SIZE="4", BATCHING__MAX_WAIT_MS="200"
    )
    try:
        listening, lines = server.wait_for("listening")
        base = f"http://127.0.0.1:{listening['port']}"
        wait_until_ready(base)
        body, content_type = multipart(photo_bytes("chelsea.png"))
        with ThreadPoolExecutor(burst) as pool:
            futures = [pool.submit(post_photo, base, body, content_type) for _ in range(burst)]
            deadline = time.monotonic() + TIMEOUT_S
            while in_flight(base) < burst + 1 and time.monotonic() < deadline:
                time.sleep(0.02)  # polling until the whole burst is inside the server
            assert in_flight(base) >= burst + 1  # the burst, plus this scrape
            server.process.send_signal(signal.SIGTERM)
            statuses = [future.result(timeout=TIMEOUT_S) for future in futures]
        assert statuses == [200] * burst  # accepted before SIGTERM: all answered
        assert server.process.wait(timeout=40) == 0  # within the 30 s drain, plus start-up
        lines += server.rest()
    finally:
        server.close()
    names = [event["event"] for event in json_lines("".join(lines))]
    assert names.count("request_completed") >= burst
    assert names[-1] == "stopped"
    assert "shutting_down" in names


# The real server, except that every forward pass blocks forever, as a deadlocked kernel or
# a wedged driver call would: nothing in Python can interrupt it.
HANGING_SERVER = """
import sys, threading
from batching_server.models import runner as model
from batching_server.__main__ import main

def hang(self, pixels, **options):
    threading.Event().wait()

model.ModelRunner.forward = hang
sys.exit(main(sys.argv[1:]))
"""


def post_expecting_error(base: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{base}/predict", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    return get(request, TIMEOUT_S)


@pytest.mark.slow
def test_hung_forward_pass_exits_4_after_answering(tmp_path: Path) -> None:
    server = serve_random(
        tmp_path,
        program=("-c", HANGING_SERVER),
        MODEL__WARMUP="false",
        MODEL__STALL_TIMEOUT_S="1",
        BATCHING__REQUEST_TIMEOUT_S="30",
    )
    try:
        listening, lines = server.wait_for("listening")
        base = f"http://127.0.0.1:{listening['port']}"
        wait_until_ready(base)
        status, body = post_expecting_error(base, *multipart(photo_bytes("chelsea.png")))
        assert status == 503
        assert body["error"]["type"] == "model_stalled"
        # Without the exit path the process would hang on its stuck thread forever.
        assert server.process.wait(timeout=TIMEOUT_S) == 4
        lines += server.rest()
    finally:
        server.close()
    events = json_lines("".join(lines))
    names = [event["event"] for event in events]
    stalled = next(e for e in events if e["event"] == "model_stalled")
    assert stalled["level"] == "error"
    assert stalled["running_s"] > 1
    failed = next(e for e in events if e["event"] == "failed")
    assert failed["exit_code"] == 4
    assert "model stalled" in failed["reason"]
    assert "model_threads_abandoned" in names
    assert names[-1] == "stopped"


@pytest.mark.slow
def test_sigterm_during_a_background_compile_exits_0_at_once(tmp_path: Path) -> None:
    """The drain does not wait for the build: its process (and its compilers) are killed,
    and a later start finds no entry, only what a killed build leaves."""
    cache = tmp_path / "cache"
    server = serve_random(
        tmp_path,
        MODEL__NAME="resnet18",
        MODEL__WARMUP="false",
        MODEL__COMPILE="auto",
        MODEL__COMPILE_CACHE_DIR=str(cache),
    )
    try:
        process, lines = server.wait_for("model_compile_process_started")
        _, more = server.wait_for("compiling_graph")  # logged by the build process
        lines += more
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=TIMEOUT_S) == 0
        lines += server.rest()
    finally:
        server.close()
    names = [event["event"] for event in json_lines("".join(lines))]
    assert names.index("ready") < names.index("model_compiling_in_background")
    assert names.index("shutting_down") < names.index("stopped")
    # Neither a failure nor a swap: abandoned (logged if its thread gets there before exit).
    assert not {"compile_failed", "model_compiled", "compiled_graph_built"} & set(names)
    with pytest.raises(ProcessLookupError):
        os.kill(process["pid"], 0)  # killed and reaped
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []  # no entry


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_metrics_port_serves_metrics_apart_from_the_api(tmp_path: Path) -> None:
    metrics_port = free_port()
    server = serve_random(tmp_path, MODEL__WARMUP="false", METRICS__PORT=str(metrics_port))
    try:
        listening, _ = server.wait_for("listening")
        metrics_listening, _ = server.wait_for("metrics_listening")
        assert metrics_listening["port"] == metrics_port
        assert metrics_listening["host"] == "127.0.0.1"  # server.host, as metrics.host is empty
        base = f"http://127.0.0.1:{listening['port']}"
        wait_until_ready(base)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/metrics", timeout=10)
        missing.value.close()
        assert missing.value.code == 404
        assert in_flight(f"http://127.0.0.1:{metrics_port}") == 0
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=TIMEOUT_S) == 0
    finally:
        server.close()


@pytest.mark.slow
def test_an_address_that_cannot_be_bound_exits_2_naming_it_and_the_fix(tmp_path: Path) -> None:
    with taken_port() as port:
        result = run_cli(
            tmp_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            MODEL__WEIGHTS="random",
            MODEL__WARMUP="false",
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    events = json_lines(result.stdout)
    failed = next(e for e in events if e["event"] == "cannot_listen")
    assert failed["level"] == "error"
    assert failed["error"].startswith(f"cannot listen on 127.0.0.1:{port} (")
    assert "set server.port to a free port" in failed["error"]
    assert events[-1]["event"] == "stopped"
    assert events[-1]["exit_code"] == 2


@pytest.mark.slow
def test_a_grpc_port_in_use_exits_2_naming_it_and_the_fix(tmp_path: Path) -> None:
    with taken_port() as port:
        result = run_cli(
            tmp_path,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            MODEL__NAME="resnet18",
            MODEL__WEIGHTS="random",
            MODEL__WARMUP="false",
            OIP__GRPC_PORT=str(port),
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    events = json_lines(result.stdout)
    failed = next(e for e in events if e["event"] == "cannot_listen")
    assert failed["error"].startswith(f"cannot listen for gRPC on 127.0.0.1:{port} (")
    assert "set oip.grpc_port to a free port" in failed["error"]
    assert events[-1] == {**events[-1], "event": "stopped", "exit_code": 2}


@pytest.mark.slow
def test_hung_warmup_pass_exits_4(tmp_path: Path) -> None:
    server = serve_random(
        tmp_path,
        program=("-c", HANGING_SERVER),
        MODEL__WARMUP="true",
        MODEL__STALL_TIMEOUT_S="1",
        BATCHING__MAX_BATCH_SIZE="2",
    )
    try:
        _, lines = server.wait_for("listening")
        # Without the watchdog on warm-up passes it would stay unready forever.
        assert server.process.wait(timeout=TIMEOUT_S) == 4
        lines += server.rest()
    finally:
        server.close()
    events = json_lines("".join(lines))
    names = [event["event"] for event in events]
    assert "ready" not in names
    failed = next(e for e in events if e["event"] == "failed")
    assert failed["exit_code"] == 4
    # Counted as busy, the hung warm-up pass is abandoned, not waited for.
    assert "model_threads_abandoned" in names
    assert names[-1] == "stopped"


def wait_in_flight(base: str, requests: int) -> None:
    """Poll (bounded) until ``requests`` are inside the server, besides the scrape itself."""
    deadline = time.monotonic() + TIMEOUT_S
    while in_flight(base) < requests + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert in_flight(base) >= requests + 1


@pytest.mark.slow
def test_sigterm_during_a_hung_pass_exits_4_once_the_watchdog_sees_it(tmp_path: Path) -> None:
    server = serve_random(
        tmp_path,
        program=("-c", HANGING_SERVER),
        MODEL__WARMUP="false",
        MODEL__STALL_TIMEOUT_S="5",  # long enough that SIGTERM comes first
        SERVER__GRACEFUL_SHUTDOWN_TIMEOUT_S="60",
        BATCHING__REQUEST_TIMEOUT_S="60",
    )
    try:
        listening, lines = server.wait_for("listening")
        base = f"http://127.0.0.1:{listening['port']}"
        wait_until_ready(base)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                post_expecting_error, base, *multipart(photo_bytes("chelsea.png"))
            )
            wait_in_flight(base, 1)
            server.process.send_signal(signal.SIGTERM)
            status, body = pending.result(timeout=TIMEOUT_S)
        assert status == 503
        assert body["error"]["type"] == "model_stalled"
        # The drain is watched: not exit 0, and not a hang on the stuck thread.
        assert server.process.wait(timeout=TIMEOUT_S) == 4
        lines += server.rest()
    finally:
        server.close()
    names = [event["event"] for event in json_lines("".join(lines))]
    assert names.index("shutting_down") < names.index("model_stalled")
    assert names[-1] == "stopped"


@pytest.mark.slow
def test_a_second_sigterm_answers_the_waiting_and_exits_143(tmp_path: Path) -> None:
    server = serve_random(
        tmp_path,
        program=("-c", HANGING_SERVER),
        MODEL__WARMUP="false",
        MODEL__STALL_TIMEOUT_S="0",  # no watchdog: only the second signal can end the drain
        SERVER__GRACEFUL_SHUTDOWN_TIMEOUT_S="600",
        BATCHING__REQUEST_TIMEOUT_S="600",
    )
    try:
        listening, lines = server.wait_for("listening")
        base = f"http://127.0.0.1:{listening['port']}"
        wait_until_ready(base)
        body, content_type = multipart(photo_bytes("chelsea.png"))
        request = urllib.request.Request(
            f"{base}/predict", data=body, headers={"Content-Type": content_type}, method="POST"
        )
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(urllib.request.urlopen, request, timeout=TIMEOUT_S)
            wait_in_flight(base, 1)
            server.process.send_signal(signal.SIGTERM)
            _, more = server.wait_for("shutting_down")
            lines += more
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(urllib.error.HTTPError) as answered:
                pending.result(timeout=TIMEOUT_S)
        with answered.value as error:
            assert error.code == 503
            assert error.headers["Retry-After"] == "1"
            assert json.load(error)["error"]["type"] == "shutting_down"
        assert server.process.wait(timeout=TIMEOUT_S) == 143  # 128 + SIGTERM
        lines += server.rest()
    finally:
        server.close()
    events = json_lines("".join(lines))
    forced = next(e for e in events if e["event"] == "forced_shutdown")
    assert (forced["signal"], forced["exit_code"]) == ("SIGTERM", 143)
    assert events[-1]["event"] == "stopped"
    assert events[-1]["exit_code"] == 143


@pytest.mark.slow
def test_keepalive_timeout_closes_a_connection_whose_headers_never_end(tmp_path: Path) -> None:
    server = serve_random(tmp_path, MODEL__WARMUP="false", SERVER__KEEPALIVE_TIMEOUT_S="1")
    try:
        listening, _ = server.wait_for("listening")
        with socket.create_connection(("127.0.0.1", listening["port"]), timeout=20) as client:
            client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
            # The server closes it (an empty read); without the setting recv() times out.
            assert client.recv(1024) == b""
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=TIMEOUT_S) == 0
    finally:
        server.close()
