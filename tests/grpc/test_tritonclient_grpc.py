"""The Open Inference Protocol over gRPC as Triton's own client speaks it (tritonclient.grpc).

The client runs in a process of its own (``triton_grpc_client.py``): its generated messages
and the server's share the proto package ``inference``, which protobuf allows once a process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from batching_server.grpc.proto import grpc_predict_v2_pb2 as pb
from batching_server.grpc.proto import grpc_predict_v2_pb2_grpc as services
from batching_server.grpc.server import GRPC_SERVER
from batching_server.models import RESNET50, ModelRunner
from batching_server.preprocess import Preprocessor
from tests.conftest import AppClient, saturate
from tests.images import photo_bytes
from tests.metrics_text import scrape, value

pytestmark = pytest.mark.slow

CLIENT = Path(__file__).with_name("triton_grpc_client.py")
KEY = "key-0123456789abcdef"
CONCURRENCY = 16


async def run_client(client: Any, **arguments: Any) -> dict[str, Any]:
    """What tritonclient.grpc, in its own process, got from the app's gRPC port."""
    url = f"127.0.0.1:{client.app[GRPC_SERVER].port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT),
        json.dumps({"url": url, **arguments}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    paths = []
    for name in ("chelsea.png", "coffee.png"):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(photo_bytes(name))
        paths.append(str(path))
    return paths


async def test_tritonclient_grpc_health_metadata_inference_and_errors(
    app_client: AppClient, images: list[str], tmp_path: Path
) -> None:
    client = await app_client(grpc=True)
    pixels = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**8)(
        photo_bytes("chelsea.png")
    )
    np.save(tmp_path / "pixels.npy", pixels[None].numpy())
    seen = await run_client(
        client, scenario="session", images=images, pixels=str(tmp_path / "pixels.npy")
    )
    assert (seen["live"], seen["ready"], seen["model_ready"]) == (True, True, True)
    assert seen["server"]["name"] == "batching_server"
    assert "classification" in seen["server"]["extensions"]
    assert seen["inputs"] == ["image", "pixels"]
    probabilities = np.array(seen["probabilities"])
    assert probabilities.shape == (2, 1000)
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)
    assert seen["id"] == "triton-grpc-1"
    for row, ranked in zip(probabilities, seen["top3"], strict=True):
        score, index, label = ranked[0].split(":", 2)
        assert int(index) == int(row.argmax())
        assert label == RESNET50.labels[int(index)]
        assert float(score) == pytest.approx(float(row.max()), abs=1e-6)
    assert np.array(seen["by_pixels"])[0] == pytest.approx(probabilities[0], abs=1e-5)
    assert seen["bad_shape"] == "StatusCode.INVALID_ARGUMENT"
    assert seen["corrupt"] == "StatusCode.INVALID_ARGUMENT"
    assert seen["unknown_model"] == "StatusCode.NOT_FOUND"


async def test_concurrent_tritonclient_grpc_calls_are_batched(
    app_client: AppClient, images: list[str]
) -> None:
    # Batches form only from calls that wait: the oldest waits for up to max_wait_ms.
    client = await app_client(
        grpc=True, batching={"max_wait_ms": 200.0, "dispatch_when_idle": False}
    )
    seen = await run_client(
        client, scenario="concurrent", images=images[:1], concurrency=CONCURRENCY
    )
    assert seen["answers"] == [[1, 1000]] * CONCURRENCY
    samples = await scrape(client)
    # One image per call: more images than batches means calls shared forward passes.
    assert value(samples, "batch_size_sum") == CONCURRENCY
    assert value(samples, "batch_size_count") < CONCURRENCY


async def test_tritonclient_grpc_sees_unavailable_when_the_queue_is_full(
    app_client: AppClient, classifier: ModelRunner, images: list[str]
) -> None:
    channels: list[Any] = []

    async def send(client: Any) -> Any:
        if not channels:
            port = client.app[GRPC_SERVER].port
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        request = pb.ModelInferRequest(model_name="resnet50")
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        cat = photo_bytes("chelsea.png")
        request.raw_input_contents.append(len(cat).to_bytes(4, "little") + cat)
        return await services.GRPCInferenceServiceStub(channels[0]).ModelInfer(request)

    client, spy, pending = await saturate(app_client, classifier, send=send, grpc=True)
    try:
        seen = await run_client(client, scenario="one", images=images[:1])
    finally:
        spy.gate.set()
    await asyncio.gather(*pending)
    await channels[0].close()
    assert seen["failure"] == "StatusCode.UNAVAILABLE"


async def test_tritonclient_grpc_needs_the_api_key(
    app_client: AppClient, images: list[str]
) -> None:
    client = await app_client(grpc=True, auth={"api_keys": [KEY]})
    missing = await run_client(client, scenario="one", images=images[:1])
    wrong = await run_client(
        client, scenario="one", images=images[:1], headers={"authorization": "Bearer nope"}
    )
    right = await run_client(
        client, scenario="one", images=images[:1], headers={"authorization": f"Bearer {KEY}"}
    )
    assert missing["failure"] == wrong["failure"] == "StatusCode.UNAUTHENTICATED"
    assert right["failure"] is None
