"""The Open Inference Protocol without its transport: metadata, and one infer request through
the same decode pool and batcher as ``/predict``.

REST (``http/oip.py``) and gRPC (``grpc/servicer.py``) each read a request and write an answer
their own way; everything between (readiness, limits, decoding, queueing, the outputs) is here,
so the two cannot drift apart. It needs the app's state, not an HTTP request.
"""

from __future__ import annotations

import array
import asyncio
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import trace

from ..core.errors import (
    BadRequestError,
    DeadlineExceededError,
    ModelNotFoundError,
    NotReadyError,
)
from ..models.runner import ImageInput, Prediction
from ..preprocess.tensors import pixels_from_values
from ..protocols.oip import (
    InferRequest,
    InputTensor,
    OutputTensor,
    ProtocolError,
    RequestedOutput,
    classification_strings,
)
from .appkeys import BATCHER, DECODE_POOL, METRICS, READINESS, RUNNER, SETTINGS, TRACER
from .predict import await_decodes, decode_upload, upload_slot
from .uploads import Upload

__all__ = [
    "EXTENSIONS",
    "MODEL_VERSION",
    "OUTPUT",
    "SERVER_NAME",
    "InferCall",
    "check_model",
    "infer",
    "model_config",
    "model_metadata",
]

SERVER_NAME = "batching_server"
MODEL_VERSION = "1"
OUTPUT = "probabilities"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration")


def check_model(app: web.Application, asked: str, version: str | None) -> str:
    """The served model's name, once ``asked`` and ``version`` (None or empty: any) name it."""
    name = app[RUNNER].name
    if asked != name:
        raise ModelNotFoundError(f"model {asked!r} is not served here; this server serves {name!r}")
    if version and version != MODEL_VERSION:
        raise ModelNotFoundError(
            f"model {name!r} has no version {version!r}; its only version is {MODEL_VERSION!r}"
        )
    return name


def model_metadata(app: web.Application, name: str) -> dict[str, Any]:
    """The model's inputs and outputs, as tensors (shapes with -1 for the batch)."""
    runner = app[RUNNER]
    size = runner.input_size
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch_torchvision",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(runner.labels)]}],
    }


def model_config(app: web.Application, name: str) -> dict[str, Any]:
    """Triton's model configuration (its ``model_config.proto`` as JSON) for this model.

    Triton's clients read it to prepare inputs: the batch dimension is left out of ``dims``
    because ``max_batch_size`` is above 0.
    """
    runner, settings = app[RUNNER], app[SETTINGS]
    size = runner.input_size
    batching: dict[str, Any] = {
        "max_queue_delay_microseconds": round(settings.batching.max_wait_ms * 1000)
    }
    if settings.batching.batch_sizes:
        batching["preferred_batch_size"] = list(settings.batching.batch_sizes)
    return {
        "name": name,
        "platform": "pytorch_libtorch",
        "backend": "pytorch",
        "version_policy": {"specific": {"versions": [MODEL_VERSION]}},
        "max_batch_size": settings.limits.max_files_per_request,
        "input": [
            {"name": "image", "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1]},
            {
                "name": "pixels",
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [3, size, size],
            },
        ],
        "output": [
            {
                "name": OUTPUT,
                "data_type": "TYPE_FP32",
                "dims": [len(runner.labels)],
                "label_filename": "",
            }
        ],
        "dynamic_batching": batching,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class InferCall:
    """What the transport knows of one infer call before reading it."""

    request_id: str
    started: float  # time.monotonic() when the call arrived
    timeout_s: float  # its deadline, from started
    on_image_count: Callable[[int], None] = lambda count: None  # for the log line


def _outputs(parsed: InferRequest) -> list[RequestedOutput]:
    outputs = parsed.outputs or [RequestedOutput(OUTPUT, parsed.binary_output)]
    for output in outputs:
        if output.name != OUTPUT:
            raise BadRequestError(f"unknown output {output.name!r}; the output is {OUTPUT!r}")
    return outputs


async def _images(app: web.Application, tensor: InputTensor, deadline: float) -> list[Any]:
    """Model inputs for an ``image`` (BYTES) input, decoded like ``/predict`` uploads."""
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise BadRequestError(
            f"input 'image' must have the shape [N] or [N, 1], got {list(tensor.shape)}"
        )
    uploads = [
        Upload(index=i, filename=None, data=data) for i, data in enumerate(tensor.bytes_elements())
    ]
    tasks = [asyncio.create_task(decode_upload(app, u, deadline)) for u in uploads]
    try:
        return await await_decodes(uploads, tasks, deadline, noun="image")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _pixels(tensor: InputTensor, *, input_size: int) -> list[Any]:
    """Model inputs for a ``pixels`` input (runs in a decode thread: numbers to tensors)."""
    return pixels_from_values(
        tensor.numbers(), datatype=tensor.datatype, shape=tensor.shape, input_size=input_size
    )


def _output_tensors(
    outputs: list[RequestedOutput], predictions: list[Prediction], classes: int
) -> list[OutputTensor]:
    tensors = []
    count = len(predictions)
    for output in outputs:
        if output.classification:
            strings = [
                item
                for p in predictions
                for item in classification_strings(
                    p.ranked[: output.classification], p.indices[: output.classification]
                )
            ]
            k = min(output.classification, classes)
            tensors.append(
                OutputTensor(output.name, "BYTES", (count, k), data=strings, binary=output.binary)
            )
            continue
        raw = b"".join(p.probabilities or b"" for p in predictions)
        data: list[Any] = []
        if not output.binary:
            values = array.array("f")
            values.frombytes(raw)
            if sys.byteorder != "little":
                values.byteswap()
            data = values.tolist()
        tensors.append(
            OutputTensor(
                output.name, "FP32", (count, classes), data=data, raw=raw, binary=output.binary
            )
        )
    return tensors


async def infer(
    app: web.Application, call: InferCall, read: Callable[[], Awaitable[InferRequest]]
) -> tuple[InferRequest, list[OutputTensor]]:
    """Read one request with ``read`` (under an upload slot), classify its images, and return
    it with its output tensors. Raises the same ``ServiceError``s as ``/predict``."""
    readiness = app[READINESS]
    if not readiness.ready:
        raise NotReadyError(f"the server is not ready: {readiness.reason}")
    runner, settings = app[RUNNER], app[SETTINGS]
    timeout_s = call.timeout_s
    batcher = app[BATCHER]
    try:
        # Until its images are queued, this request may still join a partial batch.
        with batcher.expecting():
            async with upload_slot(app, timeout_s):
                parsed = await read()
                outputs = _outputs(parsed)
                if len(parsed.inputs) != 1:
                    raise BadRequestError("send exactly one input: 'image' or 'pixels'")
                (tensor,) = parsed.inputs
                count = tensor.shape[0] if tensor.shape else 0
                limit = settings.limits.max_files_per_request
                if not 1 <= count <= limit:
                    raise BadRequestError(
                        f"a request holds 1 to {limit} images (limits.max_files_per_request), "
                        f"got {count}"
                    )
                call.on_image_count(count)
                if tensor.name == "image":
                    pixels = await _images(app, tensor, call.started + timeout_s)
                elif tensor.name == "pixels":
                    loop = asyncio.get_running_loop()
                    pixels = await loop.run_in_executor(
                        app[DECODE_POOL].executor,
                        functools.partial(_pixels, tensor, input_size=runner.input_size),
                    )
                else:
                    raise BadRequestError(
                        f"unknown input {tensor.name!r}; send 'image' (BYTES) or 'pixels' (FP32)"
                    )
    except ProtocolError as exc:
        raise BadRequestError(str(exc)) from None
    remaining = timeout_s - (time.monotonic() - call.started)
    if remaining <= 0:
        raise DeadlineExceededError(
            f"the request deadline of {timeout_s} s passed before inference"
        )
    top_k = max((o.classification for o in outputs), default=0)
    rows = any(not o.classification for o in outputs)
    span = trace.get_current_span().get_span_context()
    inputs = [
        ImageInput(
            pixels=p,
            request_id=call.request_id,
            span_context=span,
            top_k=max(1, min(top_k, len(runner.labels))),
            probabilities=rows,
        )
        for p in pixels
    ]
    with app[TRACER].start_as_current_span("batcher.wait", attributes={"images": len(inputs)}):
        predictions = await batcher.submit_many(inputs, timeout_s=remaining)
    app[METRICS].observe_predictions([p.ranked[0] for p in predictions])
    return parsed, _output_tensors(outputs, predictions, len(runner.labels))
