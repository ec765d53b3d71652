"""The Open Inference Protocol (KServe v2) over REST, read back as its clients read it."""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from aiohttp import FormData

from batching_server.http.app import create_app
from batching_server.models import RESNET50, ModelRunner
from batching_server.preprocess import Preprocessor
from tests.conftest import AppClient, make_settings, saturate
from tests.fakes import SpyRunner
from tests.images import photo_bytes

HEADER = "Inference-Header-Content-Length"
INFER = "/v2/models/resnet50/infer"
CAT, COFFEE = photo_bytes("chelsea.png"), photo_bytes("coffee.png")


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def binary_request(
    name: str, datatype: str, shape: list[int], raw: bytes, **request: Any
) -> tuple[bytes, dict[str, str]]:
    """A request whose one input travels in binary, as tritonclient sends it."""
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            **request,
        }
    )
    return header + raw, {HEADER: str(len(header))}


def image_request(images: list[bytes], **request: Any) -> tuple[bytes, dict[str, str]]:
    return binary_request("image", "BYTES", [len(images)], length_prefixed(images), **request)


def split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON part and each binary output's bytes, by name."""
    if header_length is None:
        return orjson.loads(body), {}
    header = orjson.loads(body[: int(header_length)])
    binary, offset = {}, int(header_length)
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            binary[output["name"]] = body[offset : offset + size]
            offset += size
    assert offset == len(body)
    return header, binary


async def post(client: Any, path: str, body: bytes, headers: dict[str, str]) -> Any:
    """POST raw bytes (as a stream: aiohttp warns about large bytes bodies)."""
    return await client.post(path, data=io.BytesIO(body), headers=headers)


async def infer(client: Any, body: bytes, headers: dict[str, str]) -> tuple[Any, Any, Any]:
    response = await post(client, INFER, body, headers)
    payload = await response.read()
    if response.status != 200:
        return response, orjson.loads(payload), {}
    header, binary = split(payload, response.headers.get(HEADER))
    return response, header, binary


def floats(raw: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def test_server_and_model_metadata(app_client: AppClient) -> None:
    client = await app_client()
    server = await (await client.get("/v2")).json()
    assert server["name"] == "batching_server"
    assert set(server["extensions"]) >= {"binary_tensor_data", "classification"}
    for path in ("/v2/models/resnet50", "/v2/models/resnet50/versions/1"):
        model = await (await client.get(path)).json()
        assert model["name"] == "resnet50"
        assert model["versions"] == ["1"]
        assert {i["name"]: i["shape"] for i in model["inputs"]} == {
            "image": [-1],
            "pixels": [-1, 3, 224, 224],
        }
        assert model["outputs"] == [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}
        ]
    for path in ("/v2/models/resnet18", "/v2/models/resnet50/versions/2"):
        response = await client.get(path)
        assert response.status == 404
        body = await response.json()
        assert list(body) == ["error"]  # the protocol's error shape, nothing else
        assert isinstance(body["error"], str)


async def test_health_and_readiness(
    app_client: AppClient, aiohttp_client: Any, classifier: ModelRunner
) -> None:
    client = await app_client()
    assert (await client.get("/v2/health/live")).status == 200
    assert (await client.get("/v2/health/ready")).status == 200
    assert (await client.get("/v2/models/resnet50/ready")).status == 200
    assert (await client.get("/v2/models/resnet50/versions/1/ready")).status == 200
    assert (await client.get("/v2/models/other/ready")).status == 404

    spy = SpyRunner(classifier)
    spy.warmup_gate.clear()
    warming = await aiohttp_client(create_app(make_settings(model={"warmup": True}), runner=spy))
    await spy.warmup_started.wait()
    assert (await warming.get("/v2/health/live")).status == 200
    assert (await warming.get("/v2/health/ready")).status == 503
    assert (await warming.get("/v2/models/resnet50/ready")).status == 503
    body, headers = image_request([CAT])
    response = await warming.post(INFER, data=body, headers=headers)
    assert response.status == 503
    assert list(await response.json()) == ["error"]
    spy.warmup_gate.set()


async def test_classification_matches_predict(app_client: AppClient) -> None:
    client = await app_client()
    form = FormData()
    form.add_field("file", CAT, filename="cat.png")
    expected = (await (await client.post("/predict?top_k=3", data=form)).json())["top_k"]
    body, headers = image_request(
        [CAT],
        id="request-7",
        outputs=[{"name": "probabilities", "parameters": {"classification": 3}}],
    )
    response, header, _ = await infer(client, body, headers)
    assert response.status == 200, header
    assert header["id"] == "request-7"
    assert header["model_name"] == "resnet50"
    (output,) = header["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "BYTES",
        [1, 3],
    )
    got = []
    for text in output["data"]:
        score, index, label = text.split(":", 2)
        assert RESNET50.labels[int(index)] == label
        got.append((label, float(score)))
    assert [label for label, _ in got] == [e["label"] for e in expected]
    assert [s for _, s in got] == pytest.approx([e["confidence"] for e in expected], abs=1e-6)


async def test_probabilities_in_binary_and_in_json(app_client: AppClient) -> None:
    client = await app_client()
    body, headers = image_request(
        [CAT, COFFEE], parameters={"binary_data_output": True}
    )  # no outputs listed: the default one, in binary as the request says
    response, header, binary = await infer(client, body, headers)
    assert response.status == 200, header
    assert response.headers["Content-Type"] == "application/octet-stream"
    (output,) = header["outputs"]
    assert (output["datatype"], output["shape"]) == ("FP32", [2, 1000])
    values = floats(binary["probabilities"])
    rows = [values[:1000], values[1000:]]
    assert [sum(row) for row in rows] == pytest.approx([1.0, 1.0], abs=1e-4)
    assert rows[0] != rows[1]

    body, headers = image_request(
        [CAT, COFFEE], outputs=[{"name": "probabilities", "parameters": {"binary_data": False}}]
    )
    response, header, binary = await infer(client, body, headers)
    assert response.headers["Content-Type"].startswith("application/json")
    assert HEADER not in response.headers
    assert binary == {}
    assert header["outputs"][0]["data"] == pytest.approx(values, abs=1e-7)


async def test_pixels_give_what_the_image_gives(app_client: AppClient) -> None:
    client = await app_client()
    pixels = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**8)(CAT)
    request = {"parameters": {"binary_data_output": True}}
    _, _, binary = await infer(client, *image_request([CAT], **request))
    from_image = floats(binary["probabilities"])
    batch = pixels[None].contiguous()
    raw32 = batch.numpy().astype("<f4").tobytes()
    response, header, binary = await infer(
        client, *binary_request("pixels", "FP32", [1, 3, 224, 224], raw32, **request)
    )
    assert response.status == 200, header
    assert floats(binary["probabilities"]) == pytest.approx(from_image, abs=1e-6)

    raw16 = batch.numpy().astype("<f2").tobytes()
    response, header, binary = await infer(
        client, *binary_request("pixels", "FP16", [1, 3, 224, 224], raw16, **request)
    )
    assert response.status == 200, header
    half = torch.tensor(floats(binary["probabilities"]))
    assert int(half.argmax()) == int(torch.tensor(from_image).argmax())

    as_json = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": [1, 3, 224, 224],
                    "data": batch.tolist(),  # nested, row-major: the protocol allows both
                }
            ],
            **request,
        }
    )
    response, header, binary = await infer(client, as_json, {})
    assert response.status == 200, header
    assert floats(binary["probabilities"]) == pytest.approx(from_image, abs=1e-6)


def _nan_pixels() -> bytes:
    values = np.zeros((1, 3, 224, 224), dtype="<f4")
    values[0, 1, 100, 100] = math.nan
    return values.tobytes()


def _request(body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return orjson.dumps(body), {}


BAD_REQUESTS = {
    "not-json": (b"{nope", {}),
    "no-inputs": _request({"inputs": []}),
    "unknown-input": binary_request("tensor", "BYTES", [1], length_prefixed([CAT])),
    "two-inputs": _request(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["y"]},
            ]
        }
    ),
    "unknown-output": image_request([CAT], outputs=[{"name": "logits"}]),
    "image-not-bytes": binary_request("image", "FP32", [1], b"\0" * 4),
    "image-count-differs": binary_request("image", "BYTES", [2], length_prefixed([CAT])),
    "image-bad-shape": binary_request("image", "BYTES", [1, 2], length_prefixed([CAT, CAT])),
    "image-cut-short": binary_request(
        "image", "BYTES", [1], length_prefixed([CAT])[:-10] + b"\xff" * 3
    ),
    "not-an-image": image_request([b"GIF89a but no"]),
    "pixels-wrong-size": binary_request("pixels", "FP32", [1, 3, 32, 32], b"\0" * 4 * 3 * 32 * 32),
    "pixels-wrong-length": binary_request("pixels", "FP32", [1, 3, 224, 224], b"\0" * 40),
    "pixels-nan": binary_request("pixels", "FP32", [1, 3, 224, 224], _nan_pixels()),
    "pixels-int": binary_request("pixels", "INT32", [1, 3, 224, 224], b"\0" * 4 * 3 * 224 * 224),
    "json-pixels-not-numbers": _request(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": ["a"]}]}
    ),
    "too-many-images": image_request([CAT] * 17),
    "binary-left-over": (
        image_request([CAT])[0] + b"extra",
        image_request([CAT])[1],
    ),
    "classification-negative": image_request(
        [CAT], outputs=[{"name": "probabilities", "parameters": {"classification": -1}}]
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
async def test_a_bad_request_is_a_protocol_400(app_client: AppClient, name: str) -> None:
    client = await app_client()
    body, headers = BAD_REQUESTS[name]
    response = await post(client, INFER, body, headers)
    assert response.status == 400, await response.text()
    payload = await response.json()
    assert list(payload) == ["error"]
    assert payload["error"]


@pytest.mark.parametrize("length", ["-1", "abc", "999999999", "0"])
async def test_a_bad_header_length_is_a_400(app_client: AppClient, length: str) -> None:
    client = await app_client()
    body, _ = image_request([CAT])
    response = await post(client, INFER, body, {HEADER: length})
    assert response.status == 400


async def test_a_full_queue_says_when_to_retry(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    body, headers = image_request([CAT])
    client, spy, pending = await saturate(
        app_client, classifier, send=lambda client: post(client, INFER, body, headers)
    )
    response = await post(client, INFER, body, headers)
    spy.gate.set()
    assert [(await r).status for r in pending] == [200, 200]
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert list(await response.json()) == ["error"]


async def test_model_configuration_as_triton_describes_it(app_client: AppClient) -> None:
    client = await app_client(
        batching={"max_wait_ms": 2.0, "batch_sizes": [1, 2, 4, 8]},
        limits={"max_files_per_request": 16},
    )
    for path in ("/v2/models/resnet50/config", "/v2/models/resnet50/versions/1/config"):
        response = await client.get(path)
        assert response.status == 200
        config = await response.json()
        assert (config["name"], config["platform"]) == ("resnet50", "pytorch_libtorch")
        assert config["max_batch_size"] == 16  # images per request: the batch dimension
        assert config["input"] == [
            {"name": "image", "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1]},
            {
                "name": "pixels",
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [3, 224, 224],
            },
        ]
        (output,) = config["output"]
        assert (output["name"], output["data_type"], output["dims"]) == (
            "probabilities",
            "TYPE_FP32",
            [1000],
        )
        assert config["dynamic_batching"] == {
            "max_queue_delay_microseconds": 2000,
            "preferred_batch_size": [1, 2, 4, 8],
        }
    assert "model_configuration" in (await (await client.get("/v2")).json())["extensions"]
    for path in ("/v2/models/resnet18/config", "/v2/models/resnet50/versions/2/config"):
        response = await client.get(path)
        assert response.status == 404
        assert list(await response.json()) == ["error"]
