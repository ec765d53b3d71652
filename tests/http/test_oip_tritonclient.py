"""The Open Inference Protocol as Triton's own Python client speaks it (``tritonclient.http``)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from batching_server.models import RESNET50
from tests.conftest import AppClient
from tests.images import photo_bytes


def _session(url: str) -> dict[str, Any]:
    """Everything a Triton user does first, in the client's own (blocking) calls."""
    client = httpclient.InferenceServerClient(url=url)
    try:
        image = httpclient.InferInput("image", [2], "BYTES")
        image.set_data_from_numpy(
            np.array([photo_bytes("chelsea.png"), photo_bytes("coffee.png")], dtype=np.object_)
        )
        probabilities = client.infer(
            "resnet50",
            [image],
            outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True)],
            request_id="triton-1",
        )
        top3 = client.infer(
            "resnet50",
            [image],
            outputs=[httpclient.InferRequestedOutput("probabilities", class_count=3)],
        )
        try:
            client.infer("resnet18", [image])
        except httpclient.InferenceServerException as exc:
            unknown = exc.message()
        else:
            unknown = None
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready("resnet50"),
            "metadata": client.get_model_metadata("resnet50"),
            "server": client.get_server_metadata(),
            "probabilities": probabilities.as_numpy("probabilities"),
            "id": probabilities.get_response()["id"],
            "top3": top3.as_numpy("probabilities"),
            "unknown": unknown,
        }
    finally:
        client.close()


async def test_tritonclient_health_metadata_and_inference(app_client: AppClient) -> None:
    client = await app_client()
    url = f"127.0.0.1:{client.server.port}"
    seen = await asyncio.to_thread(_session, url)
    assert (seen["live"], seen["ready"], seen["model_ready"]) == (True, True, True)
    assert seen["metadata"]["name"] == "resnet50"
    assert "classification" in seen["server"]["extensions"]
    probabilities = seen["probabilities"]
    assert probabilities.shape == (2, 1000)
    assert probabilities.dtype == np.float32
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)
    assert seen["id"] == "triton-1"
    top3 = seen["top3"]
    assert top3.shape == (2, 3)
    for row, ranked in zip(probabilities, top3, strict=True):
        score, index, label = ranked[0].decode().split(":", 2)
        assert int(index) == int(row.argmax())
        assert label == RESNET50.labels[int(index)]
        assert float(score) == pytest.approx(float(row.max()), abs=1e-6)
    assert seen["unknown"] is not None
    assert "resnet18" in seen["unknown"]
