"""``preprocess.device = model`` through the real app, on the CPU twin of the device decoder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from aiohttp import FormData

from batching_server.core.errors import ServiceError
from batching_server.models import RESNET50, ModelRunner
from batching_server.models.device_preprocess import DevicePreprocessor
from batching_server.models.loading import device_preprocessor
from batching_server.preprocess import EncodedJpeg, Preprocessor
from tests.conftest import AppClient, make_settings
from tests.fakes import SpyRunner
from tests.http.test_oip import image_request, infer
from tests.images import encode, photo, photo_bytes

JPEG = photo_bytes()
_SOS = JPEG.index(b"\xff\xda")
# A valid header, then entropy-coded data with a marker where none may be: the header check
# passes, and only the decode finds it (in the model thread, on the device).
CORRUPT = JPEG[: _SOS + 200] + b"\xff\x00\xff\xc0\x00" * 50 + JPEG[_SOS + 450 :]
PNG = photo_bytes("coffee.png", fmt="PNG")
PROGRESSIVE = encode(photo("rocket.jpg"), "JPEG", progressive=True)


class RecordingDevice:
    """The real device preprocessor, recording how many images each call decoded."""

    def __init__(self, real: DevicePreprocessor) -> None:
        self.real = real
        self.calls: list[int] = []

    def __call__(self, items: Sequence[EncodedJpeg]) -> list[torch.Tensor | ServiceError]:
        self.calls.append(len(items))
        return self.real(items)

    def warm_up(self) -> None:
        self.real.warm_up()


@pytest.fixture
def device_runner(classifier: ModelRunner) -> Iterator[ModelRunner]:
    """The shared model behind a runner that decodes JPEGs on its device (here the CPU)."""
    settings = make_settings(preprocess={"device": "model"})
    device = device_preprocessor(
        settings.model,
        classifier.device,
        spec=RESNET50,
        preprocess=settings.preprocess,
        limits=settings.limits,
    )
    assert device is not None
    runner = ModelRunner(
        name=classifier.name,
        labels=classifier.labels,
        forward_pass=classifier.forward_pass,
        threads=classifier.threads,
        device_preprocessor=RecordingDevice(device),  # type: ignore[arg-type]
    )
    yield runner
    runner.close()


def form(data: bytes) -> FormData:
    body = FormData()
    body.add_field("file", data, filename="image", content_type="application/octet-stream")
    return body


def cpu_confidence(classifier: ModelRunner, data: bytes) -> float:
    pixels = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**8)(data)
    return float(classifier.forward(pixels[None]).max())


async def test_a_mixed_batch_is_one_forward_pass_and_only_the_corrupt_file_fails(
    app_client: AppClient, device_runner: ModelRunner, classifier: ModelRunner
) -> None:
    spy = SpyRunner(device_runner)
    recording: Any = device_runner.device_preprocessor
    passes: list[int] = []
    forward = device_runner.forward

    def counted(pixels: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        passes.append(pixels.shape[0])
        return forward(pixels, threads=threads)

    device_runner.forward = counted  # type: ignore[method-assign]
    # The batch goes when all four are queued: full, never on a timer.
    client = await app_client(
        model=spy,
        preprocess={"device": "model"},
        batching={"max_batch_size": 4, "max_wait_ms": 10_000.0, "dispatch_when_idle": False},
    )
    files = [JPEG, CORRUPT, PNG, PROGRESSIVE]
    responses = await asyncio.gather(*(client.post("/predict", data=form(f)) for f in files))
    bodies = [await r.json() for r in responses]
    assert [r.status for r in responses] == [200, 400, 200, 200], bodies
    assert bodies[1]["error"]["type"] == "invalid_image"
    assert "corrupt or truncated" in bodies[1]["error"]["message"]
    assert spy.batch_sizes == [4]  # one batch
    assert passes == [3]  # one forward pass, without the refused image
    assert recording.calls == [2]  # the two baseline JPEGs went to the device decoder
    # The PNG and the progressive JPEG took the CPU path itself; the device-decoded JPEG's
    # tensor is within one 8-bit level of it (tests/models), which moves the seeded model's
    # probabilities a little.
    for body, data, tolerance in (
        (bodies[0], JPEG, 0.01),
        (bodies[2], PNG, 1e-4),
        (bodies[3], PROGRESSIVE, 1e-4),
    ):
        assert body["confidence"] == pytest.approx(cpu_confidence(classifier, data), abs=tolerance)
    assert (await client.post("/predict", data=form(JPEG))).status == 200  # still serves


async def test_with_preprocess_device_cpu_no_jpeg_reaches_the_device(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    client = await app_client(preprocess={"device": "cpu"})
    assert (await client.post("/predict", data=form(JPEG))).status == 200
    assert classifier.device_preprocessor is None


async def test_a_batch_of_only_refused_files_runs_no_pass(
    app_client: AppClient, device_runner: ModelRunner
) -> None:
    passes: list[int] = []
    forward = device_runner.forward

    def counted(pixels: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        passes.append(pixels.shape[0])
        return forward(pixels, threads=threads)

    device_runner.forward = counted  # type: ignore[method-assign]
    client = await app_client(model=device_runner, preprocess={"device": "model"})
    response = await client.post("/predict", data=form(CORRUPT))
    assert response.status == 400
    assert passes == []


async def test_open_inference_protocol_images_take_the_device_path(
    app_client: AppClient, device_runner: ModelRunner
) -> None:
    recording: Any = device_runner.device_preprocessor
    client = await app_client(model=device_runner, preprocess={"device": "model"})
    body, headers = image_request([JPEG, PNG])
    response, payload, _binary = await infer(client, body, headers)
    assert response.status == 200, payload
    assert recording.calls == [1]  # the JPEG; the PNG came decoded
    body, headers = image_request([CORRUPT])
    response, payload, _binary = await infer(client, body, headers)
    assert response.status == 400
    assert "corrupt or truncated" in payload["error"]
