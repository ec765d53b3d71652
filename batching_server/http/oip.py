"""The Open Inference Protocol (KServe v2) over REST, beside ``/predict``, on the same batcher.

Images come as ``image`` (BYTES: encoded files, decoded and checked exactly like uploads to
``/predict``) or as ``pixels`` (FP32/FP16, already normalised at the model's input size). The
answer is ``probabilities`` (FP32, one row per image) or, with the classification extension,
``"score:index:label"`` strings. Errors are ``{"error": "..."}`` with the usual statuses.
"""

from __future__ import annotations

import array
import asyncio
import functools
import sys
import time
from typing import Any

from aiohttp import web
from opentelemetry import trace

from .. import __version__
from ..core.errors import (
    BadRequestError,
    DeadlineExceededError,
    ModelNotFoundError,
    NotReadyError,
)
from ..models.runner import ImageInput, Prediction
from ..preprocess.tensors import pixels_from_values
from ..protocols.oip import (
    INFERENCE_HEADER,
    InferRequest,
    InputTensor,
    OutputTensor,
    ProtocolError,
    RequestedOutput,
    classification_strings,
    encode_response,
    parse_infer_request,
)
from .appkeys import (
    BATCHER,
    DECODE_POOL,
    IMAGE_COUNT,
    METRICS,
    READINESS,
    REQUEST_ID,
    RUNNER,
    SETTINGS,
    TRACER,
)
from .predict import await_decodes, decode_upload, request_timeout_s, upload_slot
from .responses import json_response
from .routes import RouteTable
from .uploads import Upload

__all__ = ["MODEL_VERSION", "routes"]

MODEL_VERSION = "1"
OUTPUT = "probabilities"
_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"

routes = RouteTable()


def _model(request: web.Request) -> str:
    """The served model's name, once the request's model and version name it."""
    name = request.app[RUNNER].name
    asked = request.match_info["model"]
    if asked != name:
        raise ModelNotFoundError(f"model {asked!r} is not served here; this server serves {name!r}")
    version = request.match_info.get("version", MODEL_VERSION)
    if version != MODEL_VERSION:
        raise ModelNotFoundError(
            f"model {name!r} has no version {version!r}; its only version is {MODEL_VERSION!r}"
        )
    return name


@routes.get("/v2", summary="Open Inference Protocol: server metadata", errors="oip")
async def server_metadata(request: web.Request) -> web.Response:
    """The server's name, version and protocol extensions."""
    return json_response(
        {
            "name": "batching_server",
            "version": __version__,
            "extensions": ["binary_tensor_data", "classification"],
        }
    )


@routes.get(
    "/v2/health/live",
    summary="Open Inference Protocol: liveness",
    public=True,
    traced=False,
    errors="oip",
)
async def live(request: web.Request) -> web.Response:
    """200 while the process can serve; 503 once it has failed for good."""
    failed = request.app[READINESS].failed
    return json_response({"live": not failed}, status=503 if failed else 200)


@routes.get(
    "/v2/health/ready",
    summary="Open Inference Protocol: readiness",
    public=True,
    traced=False,
    errors="oip",
)
async def ready(request: web.Request) -> web.Response:
    """200 once the model is loaded and warmed up, else 503."""
    is_ready = request.app[READINESS].ready
    return json_response({"ready": is_ready}, status=200 if is_ready else 503)


@routes.get(_MODEL, _VERSION, summary="Open Inference Protocol: model metadata", errors="oip")
async def model_metadata(request: web.Request) -> web.Response:
    """The model's inputs and outputs, as tensors."""
    name = _model(request)
    runner = request.app[RUNNER]
    size = runner.input_size
    return json_response(
        {
            "name": name,
            "versions": [MODEL_VERSION],
            "platform": "pytorch_torchvision",
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, size, size]},
            ],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(runner.labels)]}],
        }
    )


@routes.get(
    f"{_MODEL}/ready",
    f"{_VERSION}/ready",
    summary="Open Inference Protocol: model readiness",
    errors="oip",
)
async def model_ready(request: web.Request) -> web.Response:
    """200 once the model is ready, else 503."""
    name = _model(request)
    is_ready = request.app[READINESS].ready
    return json_response({"name": name, "ready": is_ready}, status=200 if is_ready else 503)


def _header_length(request: web.Request) -> int | None:
    raw = request.headers.get(INFERENCE_HEADER)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        raise BadRequestError(f"{INFERENCE_HEADER} must be a byte count, got {raw!r}")
    return int(raw)


def _outputs(parsed: InferRequest) -> list[RequestedOutput]:
    outputs = parsed.outputs or [RequestedOutput(OUTPUT, parsed.binary_output)]
    for output in outputs:
        if output.name != OUTPUT:
            raise BadRequestError(f"unknown output {output.name!r}; the output is {OUTPUT!r}")
    return outputs


async def _images(request: web.Request, tensor: InputTensor, deadline: float) -> list[Any]:
    """Model inputs for an ``image`` (BYTES) input, decoded like ``/predict`` uploads."""
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise BadRequestError(
            f"input 'image' must have the shape [N] or [N, 1], got {list(tensor.shape)}"
        )
    uploads = [
        Upload(index=i, filename=None, data=data) for i, data in enumerate(tensor.bytes_elements())
    ]
    tasks = [asyncio.create_task(decode_upload(request, u, deadline)) for u in uploads]
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


@routes.post(
    f"{_MODEL}/infer",
    f"{_VERSION}/infer",
    summary="Open Inference Protocol: classify images (BYTES 'image' or FP32/FP16 'pixels')",
    errors="oip",
)
async def infer(request: web.Request) -> web.Response:
    """Classify a batch of images sent as one input tensor."""
    started = time.monotonic()
    app = request.app
    readiness = app[READINESS]
    if not readiness.ready:
        raise NotReadyError(f"the server is not ready: {readiness.reason}")
    name = _model(request)
    runner, settings = app[RUNNER], app[SETTINGS]
    timeout_s = request_timeout_s(request, settings.batching.request_timeout_s)
    batcher = app[BATCHER]
    try:
        with batcher.expecting():
            async with upload_slot(request, timeout_s):
                body, header_length = await request.read(), _header_length(request)
                # Parsing is pure Python over up to limits.max_upload_bytes: off the loop.
                pool = app[DECODE_POOL].executor
                loop = asyncio.get_running_loop()
                parsed = await loop.run_in_executor(pool, parse_infer_request, body, header_length)
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
                request[IMAGE_COUNT] = count
                if tensor.name == "image":
                    pixels = await _images(request, tensor, started + timeout_s)
                elif tensor.name == "pixels":
                    pixels = await loop.run_in_executor(
                        pool,
                        functools.partial(_pixels, tensor, input_size=runner.input_size),
                    )
                else:
                    raise BadRequestError(
                        f"unknown input {tensor.name!r}; send 'image' (BYTES) or 'pixels' (FP32)"
                    )
    except ProtocolError as exc:
        raise BadRequestError(str(exc)) from None
    remaining = timeout_s - (time.monotonic() - started)
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
            request_id=request[REQUEST_ID],
            span_context=span,
            top_k=max(1, min(top_k, len(runner.labels))),
            probabilities=rows,
        )
        for p in pixels
    ]
    with app[TRACER].start_as_current_span("batcher.wait", attributes={"images": len(inputs)}):
        predictions = await batcher.submit_many(inputs, timeout_s=remaining)
    app[METRICS].observe_predictions([p.ranked[0] for p in predictions])
    body, header_length = encode_response(
        model_name=name,
        model_version=MODEL_VERSION,
        request_id=parsed.id,
        outputs=_output_tensors(outputs, predictions, len(runner.labels)),
    )
    if header_length is None:
        return web.Response(body=body, content_type="application/json")
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={INFERENCE_HEADER: str(header_length)},
    )
