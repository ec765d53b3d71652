"""Hostile requests against the real app on a loopback port: each is answered with a JSON 4xx,
early, without costing the loop or the upload slots more than its limits allow.

Bodies that a client library would not send (chunked framing by hand, gzip, bytes that are
not UTF-8 in a header, a body that stops half-way) go over a raw socket (tests/http/rawhttp).
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import FormData, streams

from batching_server.core.errors import DeadlineExceededError
from batching_server.http.appkeys import DECODE_POOL, UPLOAD_SLOTS
from batching_server.http.uploads import MAX_OTHER_PARTS
from batching_server.preprocess.pool import DecodePool
from tests.conftest import AppClient
from tests.http.rawhttp import WAIT_S, RawConnection, exchange, request_head
from tests.images import photo_bytes

JPEG = photo_bytes("chelsea.png")
BOUNDARY = b"hostileb0undary"
MULTIPART = ("Content-Type", f"multipart/form-data; boundary={BOUNDARY.decode()}")


def file_part(content: bytes = JPEG) -> bytes:
    """One ``file`` part, its closing CRLF included."""
    return (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + content + b"\r\n"
    )


EMPTY_PART = b"--" + BOUNDARY + b"\r\n\r\n\r\n"  # no headers and no content
CLOSING = b"--" + BOUNDARY + b"--\r\n"


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def assert_json_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status == status, response.body
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"]["type"] == error_type, body
    return body


async def answered_before_the_end(port: int | None, head: bytes, pieces: Iterator[bytes]) -> Any:
    """Send ``head``, then ``pieces`` one by one until the server answers; the response.

    ``pieces`` is finite and never the whole body the head declares: an answer can come only
    from a server that stopped reading early.
    """
    connection = await RawConnection.open(port)
    response_task = asyncio.create_task(connection.read_response())
    try:
        await connection.send(head)
        for piece in pieces:
            if response_task.done() or not await connection.send(piece):
                break
            await asyncio.sleep(0)  # let the response task read what has arrived
        return await asyncio.wait_for(response_task, WAIT_S)
    finally:
        response_task.cancel()
        connection.close()


# --- multipart framing counts ----------------------------------------------------------------


async def test_many_empty_parts_are_refused_before_the_body_ends(app_client: AppClient) -> None:
    # Each part costs header parsing on the loop, however small: a 20 MiB body held a million.
    client = await app_client()
    declared = 10_000_000
    head = request_head(
        "POST", "/predict", [MULTIPART, ("Content-Length", str(len(file_part()) + declared))]
    )
    pieces = iter([file_part(), *[EMPTY_PART * 50] * 200])  # 10,000 parts, far short of it
    response = await answered_before_the_end(client.server.port, head, pieces)
    body = assert_json_error(response, 400, "bad_request")
    assert "max_files_per_request" in body["error"]["message"]


async def test_many_empty_parts_in_a_chunked_body_are_refused(app_client: AppClient) -> None:
    client = await app_client()
    head = request_head("POST", "/predict", [MULTIPART, ("Transfer-Encoding", "chunked")])
    pieces = iter([chunk(file_part()), *[chunk(EMPTY_PART * 50)] * 200])  # no last chunk
    response = await answered_before_the_end(client.server.port, head, pieces)
    assert_json_error(response, 400, "bad_request")


async def test_other_fields_up_to_their_cap_are_accepted(app_client: AppClient) -> None:
    client = await app_client(limits={"max_files_per_request": 1})
    form = FormData()
    for i in range(MAX_OTHER_PARTS):
        form.add_field(f"field{i}", "value")
    form.add_field("file", JPEG, filename="x.jpg", content_type="image/jpeg")
    response = await client.post("/predict", data=form)
    assert response.status == 200, await response.text()
    form.add_field("one-too-many", "value")
    response = await client.post("/predict", data=form)
    assert response.status == 400


async def test_a_long_preamble_is_refused_before_the_body_ends(app_client: AppClient) -> None:
    # aiohttp reads a preamble line by line, each a call on the loop, before the first part.
    client = await app_client()
    head = request_head("POST", "/predict", [MULTIPART, ("Content-Length", "10000000")])
    pieces = iter([b"\r\n" * 5_000] * 100)
    response = await answered_before_the_end(client.server.port, head, pieces)
    body = assert_json_error(response, 400, "bad_request")
    assert "lines" in body["error"]["message"]


async def test_an_endless_epilogue_counts_toward_the_limit(app_client: AppClient) -> None:
    # The epilogue follows the last part: it used to be left for aiohttp to drain, unread.
    client = await app_client(limits={"max_upload_bytes": 200_000})
    head = request_head("POST", "/predict", [MULTIPART, ("Transfer-Encoding", "chunked")])
    pieces = iter([chunk(file_part() + CLOSING), *[chunk(b"x" * 8190 + b"\r\n")] * 200])
    response = await answered_before_the_end(client.server.port, head, pieces)
    body = assert_json_error(response, 413, "payload_too_large")
    assert "max_upload_bytes" in body["error"]["message"]


# --- compressed bodies -----------------------------------------------------------------------


@pytest.fixture
def inflated_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes fed to aiohttp's stream readers (after inflation) while the test runs."""
    fed: list[int] = []
    feed_data = streams.StreamReader.feed_data

    def counted(self: streams.StreamReader, data: bytes, size: int = 0) -> bool:
        fed.append(len(data))
        return feed_data(self, data, size)

    monkeypatch.setattr(streams.StreamReader, "feed_data", counted)
    return fed


async def test_a_gzip_bomb_is_refused_without_inflating_it(
    app_client: AppClient, inflated_bytes: list[int]
) -> None:
    client = await app_client(limits={"max_upload_bytes": 1 << 20})
    bomb_size = 64 << 20
    bomb = gzip.compress(file_part(bytes(bomb_size)) + CLOSING, compresslevel=9)
    head = request_head(
        "POST",
        "/predict",
        [MULTIPART, ("Content-Encoding", "gzip"), ("Content-Length", str(len(bomb)))],
    )
    connection = await RawConnection.open(client.server.port)
    try:
        await connection.send(head + bomb)
        response = await connection.read_response()
        body = assert_json_error(response, 415, "unsupported_media_type")
        assert "Content-Encoding" in body["error"]["message"]
        assert response.headers["connection"].lower() == "close"
        # Closed, rather than drained: aiohttp's drain would inflate the rest.
        assert await connection.closed()
    finally:
        connection.close()
    assert sum(inflated_bytes) < bomb_size // 16


async def test_a_compressed_body_is_refused_even_when_small(app_client: AppClient) -> None:
    client = await app_client()
    body = gzip.compress(file_part() + CLOSING)
    head = request_head(
        "POST",
        "/predict",
        [MULTIPART, ("Content-Encoding", "gzip"), ("Content-Length", str(len(body)))],
    )
    response = await exchange(client.server.port, head + body)
    assert_json_error(response, 415, "unsupported_media_type")


# --- deadlines -------------------------------------------------------------------------------


async def test_a_body_too_slow_to_arrive_is_408_and_frees_its_slot(app_client: AppClient) -> None:
    # One upload slot: the trickling client holds it until its deadline, then the other
    # request, waiting for the slot, is served.
    client = await app_client(limits={"max_concurrent_uploads": 1})
    body = file_part() + CLOSING
    head = request_head(
        "POST",
        "/predict",
        [MULTIPART, ("Content-Length", str(len(body))), ("X-Request-Timeout", "0.5")],
    )
    connection = await RawConnection.open(client.server.port)
    response_task = asyncio.create_task(connection.read_response())
    form = FormData()
    form.add_field("file", JPEG, filename="x.jpg", content_type="image/jpeg")
    other: asyncio.Task[Any] | None = None
    try:
        assert await connection.send(head + body[:100])
        # A byte now and then: each read succeeds, so only a deadline on the whole body ends
        # it. The pace is the client's; nothing below asserts on time. Bounded: the body is
        # never finished, and the loop ends by count if no answer comes.
        for i, byte in enumerate(body[100:1000]):
            if response_task.done() or not await connection.send(bytes([byte])):
                break
            if i == 0:
                for _ in range(500):  # bounded: until the trickling request holds the slot
                    if client.app[UPLOAD_SLOTS].locked():
                        break
                    await asyncio.sleep(0.01)
                assert client.app[UPLOAD_SLOTS].locked()
                other = asyncio.create_task(client.post("/predict", data=form))
            await asyncio.sleep(0.02)
        response = await asyncio.wait_for(response_task, WAIT_S)
        error = assert_json_error(response, 408, "request_timeout")
        assert "request_timeout_s" in error["error"]["message"]
        assert other is not None
        served = await asyncio.wait_for(other, WAIT_S)
        assert served.status == 200, await served.text()
    finally:
        response_task.cancel()
        if other is not None:
            other.cancel()
        connection.close()


class GatedPreprocessor:
    """Wraps the real preprocessor: records each call, and holds the first on ``gate``."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gate = threading.Event()
        self.holding = threading.Event()
        self.calls = 0

    def prepare(self, data: bytes, *, deadline: float | None = None) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.holding.set()
            self.gate.wait(WAIT_S)  # bounded, should the test fail before opening it
        return self.real.prepare(data, deadline=deadline)


async def test_an_image_past_its_deadline_in_the_decode_queue_is_504_and_never_decoded(
    app_client: AppClient,
) -> None:
    client = await app_client(preprocess={"threads": 1})
    pool = client.app[DECODE_POOL]
    gated = GatedPreprocessor(pool.preprocessor)
    pool.preprocessor = gated  # type: ignore[assignment]  # called as the real one is
    form = FormData()
    form.add_field("file", JPEG, filename="x.jpg", content_type="image/jpeg")
    first = asyncio.create_task(client.post("/predict", data=form))
    try:
        assert await asyncio.to_thread(gated.holding.wait, WAIT_S)  # the one thread is held
        # This one's image waits behind it in the pool's queue until its deadline passes.
        late = await asyncio.wait_for(
            client.post("/predict", data=form, headers={"X-Request-Timeout": "0.2"}), WAIT_S
        )
        assert late.status == 504, await late.text()
        assert (await late.json())["error"]["type"] == "deadline_exceeded"
        assert not first.done()
    finally:
        gated.gate.set()
    assert (await asyncio.wait_for(first, WAIT_S)).status == 200
    # One thread takes the queue in order: had the late image stayed queued, it would have
    # been decoded before this one.
    assert (await client.post("/predict", data=form)).status == 200
    assert gated.calls == 2


async def test_the_decode_pool_skips_an_image_whose_deadline_has_passed() -> None:
    calls: list[bytes] = []

    class Recording:
        def prepare(self, data: bytes, *, deadline: float | None = None) -> Any:
            calls.append(data)
            return data

    pool = DecodePool(preprocessor=Recording(), threads=1)  # type: ignore[arg-type]
    try:
        result, seconds = await pool.decode(b"late", deadline=time.monotonic())
        assert isinstance(result, DeadlineExceededError)
        assert seconds == 0.0
        assert calls == []
        result, _ = await pool.decode(b"in time", deadline=time.monotonic() + WAIT_S)
        assert calls == [b"in time"]
        assert result is not None  # the preprocessor's own return, here the bytes
    finally:
        pool.close()


# --- client input that used to be a 500 ------------------------------------------------------


@pytest.mark.parametrize(
    "top_k",
    [
        pytest.param("\u00b2", id="superscript-two"),  # str.isdigit() is true; int() refuses
        pytest.param("\u0663", id="arabic-indic-three"),  # int() reads it; ASCII only
        pytest.param("1" * 5_000, id="5000-digits"),  # over int()'s digit limit
        pytest.param("0" * 20 + "1", id="leading-zeros"),
    ],
)
async def test_odd_top_k_is_400(app_client: AppClient, top_k: str) -> None:
    client = await app_client()
    target = f"/predict?top_k={urllib.parse.quote(top_k)}"
    response = await exchange(
        client.server.port, request_head("POST", target, [MULTIPART, ("Content-Length", "0")])
    )
    body = assert_json_error(response, 400, "bad_request")
    assert body["error"]["message"].startswith("top_k must be an integer")
    assert len(body["error"]["message"]) < 200  # the value is quoted, cut short


async def test_a_long_charset_part_is_400(app_client: AppClient) -> None:
    # aiohttp raises a bare RuntimeError for a first part named _charset_ of 32+ bytes.
    # (A boundary shorter than aiohttp's own: with a long one, it trips an assertion first.)
    client = await app_client()
    charset = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\n'
    body = charset + b"x" * 40 + b"\r\n" + file_part() + CLOSING
    response = await client.post("/predict", data=body, headers=dict([MULTIPART]))
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["type"] == "bad_request"


@pytest.mark.parametrize("token", [b"\xff", b"\xc3\x28", b"k" * 20 + b"\xff"])
async def test_a_bearer_token_that_is_not_utf8_is_401(app_client: AppClient, token: bytes) -> None:
    client = await app_client(auth={"api_keys": ["k" * 20]})
    for target in ("/predict", "/", "/nowhere"):
        response = await exchange(
            client.server.port,
            request_head("GET", target, [("Authorization", b"Bearer " + token)]),
        )
        assert_json_error(response, 401, "unauthorized")


async def test_a_bad_part_named_by_bytes_that_are_not_utf8_is_400(app_client: AppClient) -> None:
    # The error names the part by its filename, which the JSON encoder used to refuse.
    client = await app_client()
    bad = (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="\xff\xfe.jpg"\r\n\r\nnot an image\r\n'
    )
    body = file_part() + bad + CLOSING
    head = request_head("POST", "/predict", [MULTIPART, ("Content-Length", str(len(body)))])
    response = await exchange(client.server.port, head + body)
    error = assert_json_error(response, 400, "invalid_image")
    assert error["error"]["message"].startswith("file 2 (\\udcff\\udcfe.jpg): ")
