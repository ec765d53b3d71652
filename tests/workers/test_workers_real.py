"""``server.workers = 2`` as real processes: both answer, one dies, the fleet drains or dies.

Small model (resnet18), random weights, no warm-up: start-up is mostly importing torch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batching_server.grpc.proto import grpc_predict_v2_pb2 as pb
from batching_server.grpc.proto import grpc_predict_v2_pb2_grpc as services
from tests.conftest import taken_port
from tests.images import photo_bytes
from tests.test_cli import (
    TIMEOUT_S,
    ServerProcess,
    cli_env,
    free_port,
    json_lines,
    multipart,
    run_cli,
    serve_random,
    wait_until_ready,
)

pytestmark = pytest.mark.slow

SMALL = {"MODEL__NAME": "resnet18", "MODEL__WARMUP": "false", "BATCHING__MAX_BATCH_SIZE": "2"}


def serve_workers(tmp_path: Path, **variables: str) -> ServerProcess:
    return serve_random(tmp_path, SERVER__WORKERS="2", **(SMALL | variables))


def post(base: str, body: bytes, content_type: str) -> tuple[int, str | None]:
    """Status and X-Worker of one /predict; raises if the connection broke (no answer)."""
    request = urllib.request.Request(
        f"{base}/predict", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read()
            return response.status, response.headers.get("X-Worker")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers.get("X-Worker")


def scrape(base: str) -> dict[str, float]:
    """``http_requests_total`` of /predict summed over statuses, and the fleet gauges."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {"predict": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "http_requests_total" and sample.labels["endpoint"] == "/predict":
                found["predict"] += sample.value
            elif sample.name in ("workers", "worker_restarts_total", "http_requests_in_flight"):
                found[sample.name] = sample.value
    return found


def worker_pids(lines: list[str]) -> dict[int, int]:
    """The latest pid of each worker index, from the supervisor's worker_warming lines."""
    pids = {}
    for event in json_lines("".join(lines)):
        if event["event"] == "worker_warming":
            pids[event["worker"]] = event["pid"]
    return pids


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_supervisor_ready(server: ServerProcess, lines: list[str]) -> None:
    while True:
        event, seen = server.wait_for("ready")
        lines += seen
        if event["logger"] == "batching_server.supervisor":
            return


def test_two_workers_answer_survive_a_kill_and_drain_on_sigterm(tmp_path: Path) -> None:
    server = serve_workers(tmp_path)
    body, content_type = multipart(photo_bytes("chelsea.png"))
    try:
        listening, lines = server.wait_for("listening")
        assert listening["logger"] == "batching_server.supervisor"
        base = f"http://127.0.0.1:{listening['port']}"
        wait_for_supervisor_ready(server, lines)
        assert wait_until_ready(base)["status"] == "ready"
        pids = worker_pids(lines)
        assert sorted(pids) == [0, 1]
        assert all(alive(pid) for pid in pids.values())

        # Both workers answer: concurrent requests keep one busy while the other accepts.
        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(lambda _: post(base, body, content_type), range(16)))
        assert {status for status, _ in first} == {200}
        assert {worker for _, worker in first} == {"0", "1"}
        before_kill = scrape(base)
        assert before_kill["predict"] == 16
        assert before_kill["workers"] == 2

        # kill -9 of worker 0 mid-burst: the survivor keeps answering, nothing is lost
        # from the sums, and the worker is replaced.
        answered = 0
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, base, body, content_type) for _ in range(24)]
            while sum(f.done() for f in futures) < 4:
                time.sleep(0.01)  # polling until the burst is under way
            os.kill(pids[0], signal.SIGKILL)
            for future in futures:
                try:
                    status, _ = future.result(timeout=TIMEOUT_S)
                except (ConnectionError, urllib.error.URLError):
                    continue  # it was on the killed worker's connection: no answer
                assert status == 200
                answered += 1
        assert answered >= 12  # the survivor took its share, and more after the kill
        died, seen = server.wait_for("worker_died")
        lines += seen
        assert (died["worker"], died["exit_code"]) == (0, 137)
        after_kill = scrape(base)
        assert after_kill["predict"] == 16 + answered  # exactly the client's count
        assert after_kill["worker_restarts_total"] == 1
        wait_for_supervisor_ready(server, lines)
        replacement = worker_pids(lines)[0]
        assert replacement != pids[0]
        assert scrape(base)["predict"] >= after_kill["predict"]  # monotonic

        # SIGTERM mid-burst: every accepted request is answered, on both workers, exit 0.
        burst = 8
        with ThreadPoolExecutor(burst) as pool:
            futures = [pool.submit(post, base, body, content_type) for _ in range(burst)]
            deadline = time.monotonic() + TIMEOUT_S
            while scrape(base)["http_requests_in_flight"] < burst + 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)  # polling until the whole burst is inside the workers
            server.process.send_signal(signal.SIGTERM)
            statuses = [future.result(timeout=TIMEOUT_S)[0] for future in futures]
        assert statuses == [200] * burst
        assert server.process.wait(timeout=40) == 0
        lines += server.rest()
    finally:
        server.close()
    events = json_lines("".join(lines))
    stopped = [e for e in events if e["event"] == "worker_stopped"]
    assert sorted((e["worker"], e["exit_code"]) for e in stopped) == [(0, 0), (1, 0)]
    assert events[-1]["event"] == "stopped"
    assert events[-1]["logger"] == "batching_server.supervisor"
    # Every worker's line names it; the supervisor's own lines name the worker they concern.
    assert {e.get("worker") for e in events if e["event"] == "request_completed"} == {0, 1}
    assert not any(alive(pid) for pid in [*pids.values(), replacement])


def test_sigkill_of_the_supervisor_leaves_no_worker_behind(tmp_path: Path) -> None:
    server = serve_workers(tmp_path)
    pids: dict[int, int] = {}
    try:
        _, lines = server.wait_for("listening")
        wait_for_supervisor_ready(server, lines)
        pids.update(worker_pids(lines))
        assert len(pids) == 2
        server.process.kill()
        server.process.wait(TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling: the kernel signals the workers, which drain and exit
        assert [pid for pid in pids.values() if alive(pid)] == []
    finally:
        # Never leave one running, even when the test fails; first, since a worker left
        # behind holds the server's stdout open.
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        server.close()


def test_a_checkpoint_every_worker_fails_to_load_stops_the_server(tmp_path: Path) -> None:
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    result = run_cli(
        tmp_path,
        "--port",
        "0",
        SERVER__WORKERS="2",
        MODEL__WEIGHTS=str(tmp_path / "broken.pt"),
        **SMALL,
    )
    assert result.returncode == 3  # the workers' own status: the model failed to load
    events = json_lines(result.stdout)
    names = [e["event"] for e in events]
    assert names.count("worker_warming") == 2  # no restart loop: this cannot heal
    assert "model_load_failed" in names
    failed = next(e for e in events if e["event"] == "worker_failed_at_startup")
    assert failed["level"] == "error"
    assert re.search(r"worker \d exited with status 3 before it was ready", failed["error"])
    assert names[-1] == "stopped"


def test_one_worker_runs_the_single_process_server(tmp_path: Path) -> None:
    server = serve_random(tmp_path, SERVER__WORKERS="1", **SMALL)
    try:
        listening, lines = server.wait_for("listening")
        base = f"http://127.0.0.1:{listening['port']}"
        wait_until_ready(base)
        with urllib.request.urlopen(f"{base}/ready", timeout=10) as response:
            assert "X-Worker" not in response.headers
        # The process we started serves: it has no child process, and no supervisor logged.
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        assert children.read_text().split() == []
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=40) == 0
        lines += server.rest()
    finally:
        server.close()
    events: list[dict[str, Any]] = json_lines("".join(lines))
    assert all("worker" not in e for e in events)
    assert all(e["logger"] != "batching_server.supervisor" for e in events)
    assert json.loads(lines[0])["event"] == "starting"


def test_a_port_in_use_exits_2_before_any_worker_starts(tmp_path: Path) -> None:
    with taken_port() as port:
        result = run_cli(tmp_path, "--port", str(port), SERVER__WORKERS="2", **SMALL)
    assert result.returncode == 2
    events = json_lines(result.stdout)
    assert [e["event"] for e in events] == ["starting", "cannot_listen"]
    assert f"cannot listen on 127.0.0.1:{port}" in events[1]["error"]
    assert "set server.port to a free port" in events[1]["error"]


def test_both_workers_serve_grpc_on_the_port_the_supervisor_reserved(tmp_path: Path) -> None:
    """gRPC cannot take an inherited socket: each worker binds the port the supervisor
    reserved, with SO_REUSEPORT, and the fleet answers gRPC calls."""
    grpc_port = free_port()  # oip.grpc_port = 0 would turn gRPC off
    server = serve_workers(tmp_path, OIP__GRPC_PORT=str(grpc_port))
    try:
        listening, lines = server.wait_for("listening")
        assert listening["grpc_port"] == grpc_port
        wait_for_supervisor_ready(server, lines)
        bound = [json.loads(line) for line in lines if '"grpc_listening"' in line]
        assert sorted((e["worker"], e["port"]) for e in bound) == [
            (0, grpc_port),
            (1, grpc_port),
        ]
        # While it runs, nothing without SO_REUSEPORT can take the port between them.
        with socket.socket() as intruder, pytest.raises(OSError, match="Address already in use"):
            intruder.bind(("127.0.0.1", grpc_port))
        image = photo_bytes("chelsea.png")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = services.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT_S).ready
            request = pb.ModelInferRequest(model_name="resnet18")
            request.inputs.add(name="image", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
            reply = stub.ModelInfer(request, timeout=TIMEOUT_S)
        assert [output.name for output in reply.outputs] == ["probabilities"]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=40) == 0
    finally:
        server.close()


def test_a_grpc_port_in_use_exits_2_naming_the_grpc_setting(tmp_path: Path) -> None:
    with taken_port() as port:
        result = run_cli(
            tmp_path, "--port", "0", SERVER__WORKERS="2", OIP__GRPC_PORT=str(port), **SMALL
        )
    assert result.returncode == 2
    events = json_lines(result.stdout)
    assert [e["event"] for e in events] == ["starting", "cannot_listen"]
    assert f"cannot listen on 127.0.0.1:{port}" in events[1]["error"]
    assert "set oip.grpc_port to a free port" in events[1]["error"]


def test_the_supervisor_never_imports_torch(tmp_path: Path) -> None:
    """A bad model.name still exits 2 with the catalogue's message, found by the workers: the
    supervisor checks settings without torchvision and stays small."""
    probe = tmp_path / "probe.py"
    # The supervisor, run in-process with the workers' start replaced by a record of
    # what was imported by then.
    probe.write_text(
        "import sys\n"
        "import batching_server.workers.supervisor as supervisor\n"
        "from batching_server.__main__ import main\n"
        "def supervise(settings, *, workers, argv):\n"
        "    print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
        "    return 0\n"
        "supervisor.supervise = supervise\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, str(probe), "--port", "0"],
        cwd=tmp_path,
        env=cli_env(tmp_path, SERVER__WORKERS="2", **SMALL),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"

    result = run_cli(tmp_path, "--port", "0", SERVER__WORKERS="2", MODEL__NAME="resnet5")
    assert result.returncode == 2
    assert "model.name must be the name of a torchvision classification model" in result.stderr
    assert "closest: resnet50" in result.stderr
    names = [e["event"] for e in json_lines(result.stdout)]
    assert names.count("worker_warming") == 2  # found by the workers, no restart loop
    assert names[-1] == "stopped"
