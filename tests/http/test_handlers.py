"""The HTTP API through the real app and aiohttp's test client, with a random ResNet-50."""

from __future__ import annotations

import asyncio
import gc
import io
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import FormData, multipart
from PIL import Image

from batching_server.http import uploads
from batching_server.http.app import create_app
from batching_server.http.appkeys import READINESS
from batching_server.models import RESNET50, ModelRunner
from batching_server.preprocess import Preprocessor
from tests.conftest import AppClient, make_settings, saturate
from tests.fakes import SpyRunner, TorchCalls
from tests.images import PHOTOS, encode, photo, photo_bytes

JPEG = photo_bytes("chelsea.png")


def form(*files: bytes, field: str = "file", filename: str | None = "image.jpg") -> FormData:
    data = FormData()
    for content in files:
        data.add_field(field, content, filename=filename, content_type="image/jpeg")
    return data


def expected(classifier: ModelRunner, image: bytes) -> tuple[str, float]:
    """The per-image answer, computed without the server."""
    tensor = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**8)(image)
    [[(label, confidence)]] = classifier.rank(classifier.forward(tensor[None]), [1])
    return label, confidence


async def assert_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body  # type: ignore[no-any-return]


async def assert_still_serves(client: Any) -> None:
    response = await client.post("/predict", data=form(JPEG))
    assert response.status == 200, await response.text()


# --- /predict ------------------------------------------------------------------------------


async def test_predict_classifies_a_photo(app_client: AppClient, classifier: ModelRunner) -> None:
    client = await app_client()
    response = await client.post("/predict", data=form(JPEG))
    assert response.status == 200
    body = await response.json()
    label, confidence = expected(classifier, JPEG)
    assert body["prediction"] == label
    assert body["confidence"] == pytest.approx(confidence, abs=1e-5)
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert set(body) == {"prediction", "confidence", "request_id"}


async def test_the_event_loop_makes_no_torch_call_per_request(app_client: AppClient) -> None:
    """Ranking happens in the model thread, once per batch.

    Each torch call releases the GIL, and taking it back can keep the loop waiting a switch
    interval (5 ms) while decode threads hold it.
    """
    client = await app_client()
    with TorchCalls() as calls:  # records this thread's calls only: the event loop's
        response = await client.post("/predict?top_k=3", data=form(JPEG, JPEG))
        assert response.status == 200
    assert calls.names == []
    assert len((await response.json())["predictions"][1]["top_k"]) == 3


async def test_top_k(app_client: AppClient) -> None:
    client = await app_client()
    body = await (await client.post("/predict?top_k=3", data=form(JPEG))).json()
    assert len(body["top_k"]) == 3
    assert body["top_k"][0] == {"label": body["prediction"], "confidence": body["confidence"]}
    scores = [entry["confidence"] for entry in body["top_k"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("top_k", ["0", "1001", "abc", "-1", "2.5"])
async def test_bad_top_k_is_400(app_client: AppClient, top_k: str) -> None:
    client = await app_client()
    response = await client.post(f"/predict?top_k={top_k}", data=form(JPEG))
    body = await assert_error(response, 400, "bad_request")
    assert "top_k" in body["error"]["message"]


async def test_several_files_are_classified_in_order(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    spy = SpyRunner(classifier)
    client = await app_client(model=spy, batching={"max_wait_ms": 1000.0, "max_batch_size": 3})
    images = [photo_bytes(name) for name in PHOTOS[:3]]
    response = await client.post("/predict?top_k=2", data=form(*images))
    assert response.status == 200
    body = await response.json()
    assert [(p["prediction"], len(p["top_k"])) for p in body["predictions"]] == [
        (expected(classifier, image)[0], 2) for image in images
    ]
    assert spy.batch_sizes == [3]  # one request's parts share one forward pass
    assert set(body) == {"predictions", "request_id"}


async def test_request_id_is_echoed_when_sane(app_client: AppClient) -> None:
    client = await app_client()
    response = await client.get("/health", headers={"X-Request-ID": "abc-123.x:y"})
    assert response.headers["X-Request-ID"] == "abc-123.x:y"
    for insane in ("has space", "x" * 200, "<script>", ""):
        response = await client.get("/health", headers={"X-Request-ID": insane})
        assert response.headers["X-Request-ID"] != insane
        assert len(response.headers["X-Request-ID"]) == 32


# --- bad input: each with its status, and the server keeps serving -------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb."""
    buffer = io.BytesIO()
    photo().resize((1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(
    ("content", "error_type"),
    [
        pytest.param(b"", "invalid_image", id="empty"),
        pytest.param(b"just some text\n" * 10, "invalid_image", id="text"),
        pytest.param(b"<!doctype html><html><body>hi</body></html>", "invalid_image", id="html"),
        pytest.param(JPEG[: len(JPEG) // 2], "invalid_image", id="truncated-jpeg"),
        pytest.param(photo_bytes(fmt="PNG")[:5000], "invalid_image", id="truncated-png"),
        pytest.param(png_declaring(100_000, 100_000), "image_too_large", id="bomb-png"),
    ],
)
async def test_bad_images(app_client: AppClient, content: bytes, error_type: str) -> None:
    client = await app_client()
    response = await client.post("/predict", data=form(content))
    await assert_error(response, 413 if error_type == "image_too_large" else 400, error_type)
    await assert_still_serves(client)


async def test_image_over_the_pixel_limit_is_413(app_client: AppClient) -> None:
    client = await app_client(limits={"max_image_pixels": 300 * 300})
    body = await assert_error(
        await client.post("/predict", data=form(JPEG)), 413, "image_too_large"
    )
    assert "max_image_pixels" in body["error"]["message"]


async def test_a_bad_part_among_several_is_named(app_client: AppClient) -> None:
    client = await app_client()
    response = await client.post("/predict", data=form(JPEG, b"nope", JPEG))
    body = await assert_error(response, 400, "invalid_image")
    assert body["error"]["message"].startswith("file 2 (image.jpg):")
    await assert_still_serves(client)


async def post_parts(client: Any, *parts: tuple[str, bytes]) -> Any:
    """POST a multipart body written by hand: (Content-Disposition value, content) per part."""
    body = b"".join(
        b"--b0undary\r\nContent-Disposition: "
        + disposition.encode()
        + b"\r\n\r\n"
        + content
        + b"\r\n"
        for disposition, content in parts
    )
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    return await client.post("/predict", data=body + b"--b0undary--\r\n", headers=headers)


async def test_malformed_content_disposition_is_400(app_client: AppClient) -> None:
    # Found by the fuzz test: aiohttp warns about this header, and a warning is no answer.
    client = await app_client()
    response = await post_parts(client, ('form-data; name="file"; filename-x', JPEG))
    await assert_error(response, 400, "bad_request")


async def test_malformed_content_disposition_on_a_later_part_is_400(
    app_client: AppClient,
) -> None:
    client = await app_client()
    response = await post_parts(
        client,
        ('form-data; name="file"', JPEG),
        ('form-data; name="file"; filename-x', JPEG),
    )
    await assert_error(response, 400, "bad_request")
    await assert_still_serves(client)


async def test_a_content_disposition_aiohttp_cannot_read_is_400(app_client: AppClient) -> None:
    client = await app_client()
    # aiohttp's content_disposition_filename raises ValueError on this continuation.
    response = await post_parts(client, ('form-data; name*0="\'"', JPEG))
    await assert_error(response, 400, "bad_request")
    await assert_still_serves(client)


async def test_an_encoded_filename_names_a_bad_part(app_client: AppClient) -> None:
    client = await app_client()
    response = await post_parts(
        client,
        ('form-data; name="file"', JPEG),
        ("form-data; name=\"file\"; filename*=UTF-8''caf%C3%A9.jpg", b"nope"),
    )
    error = await assert_error(response, 400, "invalid_image")
    assert error["error"]["message"].startswith("file 2 (caf\u00e9.jpg):")


async def test_each_part_header_is_parsed_once(
    app_client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp's Content-Disposition parser was 13% of the loop's time under load, and
    # BodyPartReader.name and .filename run it once each.
    calls: list[str | None] = []
    parse = multipart.parse_content_disposition

    def counting(header: str | None) -> Any:
        calls.append(header)
        return parse(header)

    monkeypatch.setattr(multipart, "parse_content_disposition", counting)
    monkeypatch.setattr(uploads, "parse_content_disposition", counting)
    client = await app_client()
    response = await client.post("/predict", data=form(JPEG, JPEG))
    assert response.status == 200, await response.text()
    # Per part, one by aiohttp's reader (looking for a _charset_ field); ours reads the
    # usual header in one regular-expression match.
    assert len(calls) == 2


async def test_wrongly_named_field_is_400(app_client: AppClient) -> None:
    client = await app_client()
    body = await assert_error(
        await client.post("/predict", data=form(JPEG, field="image")), 400, "bad_request"
    )
    assert "'image'" in body["error"]["message"]


async def test_part_without_filename_is_accepted(app_client: AppClient) -> None:
    client = await app_client()
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\n'
        ).encode()
        + JPEG
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = await client.post("/predict", data=body, headers=headers)
    assert response.status == 200, await response.text()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(JPEG, "image/jpeg", id="raw-jpeg"),
        pytest.param(b'{"file": 1}', "application/json", id="json"),
        pytest.param(b"file=x", "application/x-www-form-urlencoded", id="urlencoded"),
    ],
)
async def test_non_multipart_is_415(app_client: AppClient, body: bytes, content_type: str) -> None:
    client = await app_client()
    response = await client.post("/predict", data=body, headers={"Content-Type": content_type})
    await assert_error(response, 415, "unsupported_media_type")
    await assert_still_serves(client)


async def test_too_many_files_is_400(app_client: AppClient) -> None:
    client = await app_client(limits={"max_files_per_request": 2})
    body = await assert_error(
        await client.post("/predict", data=form(JPEG, JPEG, JPEG)), 400, "bad_request"
    )
    assert "max_files_per_request" in body["error"]["message"]


async def test_body_over_the_limit_is_413(app_client: AppClient) -> None:
    client = await app_client(limits={"max_upload_bytes": 10_000})
    response = await client.post("/predict", data=form(JPEG))
    body = await assert_error(response, 413, "payload_too_large")
    assert "max_upload_bytes" in body["error"]["message"]


async def test_huge_exif_and_icc_blobs_are_classified(app_client: AppClient) -> None:
    client = await app_client()
    exif = Image.Exif()
    exif[0x9286] = "x" * 60_000  # UserComment: close to the 64 KiB a JPEG APP1 segment holds
    exif[0x0112] = 6  # and a real orientation among it
    # 2 MiB of ICC profile: Pillow splits it over 33 APP2 segments; it is junk, never parsed.
    icc = bytes(range(256)) * (8 * 1024)
    data = encode(photo(), "JPEG", exif=exif, icc_profile=icc)
    assert len(data) > len(icc)
    upload = FormData()
    # A stream, not bytes: aiohttp warns about sending a body this large from memory.
    upload.add_field("file", io.BytesIO(data), filename="big-meta.jpg", content_type="image/jpeg")
    response = await client.post("/predict", data=upload)
    assert response.status == 200, await response.text()
    assert (await response.json())["prediction"]


async def test_an_upload_is_read_in_large_pieces(
    app_client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each read copies a window to look for the boundary; aiohttp's default of 8 KiB a read
    # meant dozens of reads (and awaits) per photo.
    reads: list[int] = []
    read_chunk = multipart.BodyPartReader.read_chunk

    async def counted(self: multipart.BodyPartReader, size: int = 8192) -> bytes:
        chunk = await read_chunk(self, size)
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(multipart.BodyPartReader, "read_chunk", counted)
    client = await app_client()
    data = encode(photo(), "JPEG", icc_profile=bytes(range(256)) * 1024)  # about 300 KB
    upload = FormData()
    upload.add_field("file", io.BytesIO(data), filename="x.jpg", content_type="image/jpeg")
    assert (await client.post("/predict", data=upload)).status == 200
    assert sum(reads) == len(data)
    assert len(reads) < len(data) // (8 * 1024) // 4


async def test_chunked_body_over_the_limit_is_413(app_client: AppClient) -> None:
    client = await app_client(limits={"max_upload_bytes": 10_000})
    payload = form(JPEG)()  # the multipart writer, so the body can be streamed
    boundary_header = payload.headers["Content-Type"]
    body = io.BytesIO()

    class Sink:
        async def write(self, chunk: bytes) -> None:
            body.write(chunk)

    await payload.write(Sink())

    async def chunks() -> AsyncIterator[bytes]:
        raw = body.getvalue()
        for start in range(0, len(raw), 4096):
            yield raw[start : start + 4096]

    response = await client.post(
        "/predict", data=chunks(), headers={"Content-Type": boundary_header}
    )
    assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
    await assert_error(response, 413, "payload_too_large")


# --- overload, deadlines, failures -----------------------------------------------------------


async def test_queue_full_is_503(app_client: AppClient, classifier: ModelRunner) -> None:
    client, spy, pending = await saturate(app_client, classifier, lambda: form(JPEG))
    await assert_error(await client.post("/predict", data=form(JPEG)), 503, "queue_full")
    spy.gate.set()
    assert [(await r).status for r in pending] == [200, 200]


async def test_deadline_is_504(app_client: AppClient, classifier: ModelRunner) -> None:
    # 1.5 s: long enough for the follow-up request's real forward pass on a slow machine.
    spy = SpyRunner(classifier)
    spy.gate.clear()
    client = await app_client(model=spy, batching={"request_timeout_s": 1.5})
    response = await client.post("/predict", data=form(JPEG))
    await assert_error(response, 504, "deadline_exceeded")
    spy.gate.set()
    await assert_still_serves(client)


async def test_forward_failure_is_500_without_details(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    client = await app_client(model=SpyRunner(classifier, fail_first=1))
    response = await client.post("/predict", data=form(JPEG))
    body = await assert_error(response, 500, "inference_failed")
    assert "secret" not in await response.text()
    assert "Traceback" not in body["error"]["message"]
    await assert_still_serves(client)


# --- probes and index -------------------------------------------------------------------------


async def test_health_ready_and_index(app_client: AppClient) -> None:
    client = await app_client()
    health = await (await client.get("/health")).json()
    assert health["status"] == "healthy"
    assert isinstance(health["timestamp"], float)
    ready = await client.get("/ready")
    assert ready.status == 200
    assert (await ready.json())["model_loaded"] is True
    index = await (await client.get("/")).json()
    assert index["service"] == "batching_server"
    assert index["batching"]["max_batch_size"] == 8
    assert "POST /predict" in index["endpoints"]


async def test_long_lived_objects_are_frozen_out_of_the_collector_once_ready(
    app_client: AppClient,
) -> None:
    gc.unfreeze()  # whatever an earlier test froze
    assert gc.get_freeze_count() == 0
    await app_client()
    # torch, the model and the app are out of the collector's reach: a full collection
    # under load no longer stops every thread to walk them.
    assert gc.get_freeze_count() > 100_000


async def test_not_ready_is_503_on_ready_and_predict(app_client: AppClient) -> None:
    client = await app_client()
    client.app[READINESS].mark_not_ready("warming up the model")
    response = await client.get("/ready")
    assert response.status == 503
    body = await response.json()
    assert (body["status"], body["reason"]) == ("not_ready", "warming up the model")
    await assert_error(await client.post("/predict", data=form(JPEG)), 503, "not_ready")


async def test_warmup_gates_readiness(aiohttp_client: Any, classifier: ModelRunner) -> None:
    spy = SpyRunner(classifier)
    spy.warmup_gate.clear()
    settings = make_settings(model={"warmup": True}, batching={"max_batch_size": 3})
    app = create_app(settings, runner=spy)
    client = await aiohttp_client(app)
    await spy.warmup_started.wait()
    response = await client.get("/ready")
    assert response.status == 503
    assert (await response.json())["reason"] == "warming up the model"
    await assert_error(await client.post("/predict", data=form(JPEG)), 503, "not_ready")
    spy.warmup_gate.set()
    await app[READINESS].wait_ready()
    assert (await client.get("/ready")).status == 200
    assert spy.warmed_sizes == [1, 2, 3]


async def test_unknown_route_and_method_are_json(app_client: AppClient) -> None:
    client = await app_client()
    await assert_error(await client.get("/nope"), 404, "not_found")
    response = await client.get("/predict")
    await assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


# --- the point of it all: concurrent uploads form batches -----------------------------------


@pytest.mark.slow
async def test_concurrent_uploads_form_batches_and_get_their_own_answers(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    spy = SpyRunner(classifier)
    client = await app_client(model=spy, batching={"max_batch_size": 8, "max_wait_ms": 50.0})
    images = [photo_bytes(name) for name in PHOTOS]
    answers = {i: expected(classifier, image) for i, image in enumerate(images)}
    uploads = [i % len(images) for i in range(24)]
    responses = await asyncio.gather(
        *(client.post("/predict", data=form(images[i])) for i in uploads)
    )
    bodies = [await r.json() for r in responses]
    assert [r.status for r in responses] == [200] * 24
    for i, body in zip(uploads, bodies, strict=True):
        assert body["prediction"] == answers[i][0]
        assert body["confidence"] == pytest.approx(answers[i][1], abs=1e-4)
    assert len({body["request_id"] for body in bodies}) == 24
    assert sum(spy.batch_sizes) == 24
    assert max(spy.batch_sizes) > 1
    assert len(spy.batch_sizes) < 24


async def test_queue_full_says_when_to_retry(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    client, spy, pending = await saturate(app_client, classifier, lambda: form(JPEG))
    response = await client.post("/predict", data=form(JPEG))
    await assert_error(response, 503, "queue_full")
    assert int(response.headers["Retry-After"]) >= 1
    spy.gate.set()
    await asyncio.gather(*pending)


@pytest.mark.parametrize("header", ["abc", "0", "-1", "inf", "nan"])
async def test_bad_deadline_header_is_400(app_client: AppClient, header: str) -> None:
    client = await app_client()
    response = await client.post("/predict", data=form(JPEG), headers={"X-Request-Timeout": header})
    body = await assert_error(response, 400, "bad_request")
    assert "X-Request-Timeout" in body["error"]["message"]


async def test_client_deadline_header_shortens_the_deadline(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    spy = SpyRunner(classifier)
    spy.gate.clear()
    client = await app_client(model=spy)  # request_timeout_s stays 30 s
    response = await client.post("/predict", data=form(JPEG), headers={"X-Request-Timeout": "0.3"})
    await assert_error(response, 504, "deadline_exceeded")
    spy.gate.set()


async def test_bearer_auth_guards_predict_only(app_client: AppClient) -> None:
    key = "k" * 20
    client = await app_client(auth={"api_keys": ["another-key-of-16+", key]})
    for headers in ({}, {"Authorization": "Bearer wrong-key-xxxxxxxxxx"}, {"Authorization": key}):
        response = await client.post("/predict", data=form(JPEG), headers=headers)
        await assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    good = await client.post(
        "/predict", data=form(JPEG), headers={"Authorization": f"Bearer {key}"}
    )
    assert good.status == 200
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_uploads_are_read_a_bounded_number_at_a_time(app_client: AppClient) -> None:
    client = await app_client(limits={"max_concurrent_uploads": 1})
    first_half_sent, finish = asyncio.Event(), asyncio.Event()
    body = form(JPEG)()
    buffer = io.BytesIO()

    class Sink:
        async def write(self, chunk: bytes) -> None:
            buffer.write(chunk)

    await body.write(Sink())
    raw = buffer.getvalue()

    async def slow_body() -> AsyncIterator[bytes]:
        yield raw[: len(raw) // 2]
        first_half_sent.set()
        await finish.wait()
        yield raw[len(raw) // 2 :]

    slow = asyncio.create_task(
        client.post("/predict", data=slow_body(), headers={"Content-Type": body.content_type})
    )
    await first_half_sent.wait()
    fast = asyncio.create_task(client.post("/predict", data=form(JPEG)))
    try:
        for _ in range(20):  # give the second request every chance to start decoding
            await asyncio.sleep(0.01)
        metrics = await (await client.get("/metrics")).text()
        # Nothing decoded yet: the histogram has no series until its first observation.
        assert "image_preprocess_duration_seconds_count" not in metrics
        assert "http_requests_in_flight 3" in metrics.splitlines()  # both, and this scrape
        assert not fast.done()
    finally:
        finish.set()
        statuses = [(await r).status for r in (slow, fast)]
    assert statuses == [200, 200]
