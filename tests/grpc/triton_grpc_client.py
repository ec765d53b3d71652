"""Triton's own gRPC client (``tritonclient.grpc``), unmodified, as a user runs it.

Run as a separate process by test_tritonclient_grpc.py: its messages and ours share the proto
package ``inference``, and protobuf refuses two definitions of one name in a process.
Prints one JSON object: what each call returned, or the status code it failed with.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL = "resnet50"


def image_input(*paths: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(paths)], "BYTES")
    tensor.set_data_from_numpy(np.array([Path(p).read_bytes() for p in paths], dtype=np.object_))
    return tensor


def failure(call: Any) -> str | None:
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    return None


def session(client: grpcclient.InferenceServerClient, args: dict[str, Any]) -> dict[str, Any]:
    cat, coffee = args["images"]
    probabilities = client.infer(MODEL, [image_input(cat, coffee)], request_id="triton-grpc-1")
    top3 = client.infer(
        MODEL,
        [image_input(cat, coffee)],
        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)],
    )
    pixels = grpcclient.InferInput("pixels", [1, 3, 224, 224], "FP32")
    pixels.set_data_from_numpy(np.load(args["pixels"]))
    by_pixels = client.infer(MODEL, [pixels])
    bad_shape = grpcclient.InferInput("pixels", [1, 3, 22, 224], "FP32")
    bad_shape.set_data_from_numpy(np.zeros((1, 3, 22, 224), np.float32))
    corrupt = grpcclient.InferInput("image", [1], "BYTES")
    corrupt.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))

    metadata = client.get_model_metadata(MODEL, as_json=True)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
        "server": client.get_server_metadata(as_json=True),
        "inputs": [tensor["name"] for tensor in metadata["inputs"]],
        "probabilities": probabilities.as_numpy("probabilities").tolist(),
        "id": probabilities.get_response().id,
        "top3": [[s.decode() for s in row] for row in top3.as_numpy("probabilities")],
        "by_pixels": by_pixels.as_numpy("probabilities").tolist(),
        "bad_shape": failure(lambda: client.infer(MODEL, [bad_shape])),
        "corrupt": failure(lambda: client.infer(MODEL, [corrupt])),
        "unknown_model": failure(lambda: client.infer("resnet18", [image_input(cat)])),
    }


def concurrent(client: grpcclient.InferenceServerClient, args: dict[str, Any]) -> dict[str, Any]:
    """One image per call, ``concurrency`` calls in flight at once (perf_analyzer's way)."""
    (cat,) = args["images"]
    done = threading.Semaphore(0)
    answers: list[Any] = []

    def completed(result: Any, error: Any) -> None:
        answers.append(error or result.as_numpy("probabilities").shape)
        done.release()

    for _ in range(args["concurrency"]):
        client.async_infer(MODEL, [image_input(cat)], completed)
    for _ in range(args["concurrency"]):
        done.acquire(timeout=60)
    return {"answers": [list(a) if isinstance(a, tuple) else str(a) for a in answers]}


def one(client: grpcclient.InferenceServerClient, args: dict[str, Any]) -> dict[str, Any]:
    headers = args.get("headers")
    return {
        "failure": failure(
            lambda: client.infer(MODEL, [image_input(*args["images"])], headers=headers)
        )
    }


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    grpc_client = grpcclient.InferenceServerClient(arguments["url"])
    try:
        scenarios = {"session": session, "concurrent": concurrent, "one": one}
        scenario = scenarios[arguments["scenario"]]
        print(json.dumps(scenario(grpc_client, arguments)))
    finally:
        grpc_client.close()
