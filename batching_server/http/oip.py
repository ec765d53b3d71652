"""The Open Inference Protocol (KServe v2) over REST, beside ``/predict``, on the same batcher.

Images come as ``image`` (BYTES: encoded files, decoded and checked exactly like uploads to
``/predict``) or as ``pixels`` (FP32/FP16, already normalised at the model's input size). The
answer is ``probabilities`` (FP32, one row per image) or, with the classification extension,
``"score:index:label"`` strings. Errors are ``{"error": "..."}`` with the usual statuses.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from .. import __version__
from ..core.errors import BadRequestError, NotReadyError
from ..protocols.oip import INFERENCE_HEADER, InferRequest, encode_response, parse_infer_request
from .appkeys import DECODE_POOL, IMAGE_COUNT, READINESS, REQUEST_ID, SETTINGS
from .oip_infer import (
    EXTENSIONS,
    MODEL_VERSION,
    SERVER_NAME,
    InferCall,
    check_model,
    infer,
    model_config,
    model_metadata,
)
from .predict import request_timeout_s
from .responses import json_response
from .routes import RouteTable

__all__ = ["routes"]

_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"

routes = RouteTable()


def _model(request: web.Request) -> str:
    """The served model's name, once the request's model and version name it."""
    return check_model(
        request.app,
        request.match_info["model"],
        request.match_info.get("version", MODEL_VERSION),
    )


@routes.get("/v2", summary="Open Inference Protocol: server metadata", errors="oip")
async def server_metadata(request: web.Request) -> web.Response:
    """The server's name, version and protocol extensions."""
    return json_response(
        {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
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
async def metadata(request: web.Request) -> web.Response:
    """The model's inputs and outputs, as tensors."""
    return json_response(model_metadata(request.app, _model(request)))


@routes.get(
    f"{_MODEL}/config",
    f"{_VERSION}/config",
    summary="Open Inference Protocol: model configuration (Triton's model_config as JSON)",
    errors="oip",
)
async def config(request: web.Request) -> web.Response:
    """Triton's model configuration, which its example clients read."""
    return json_response(model_config(request.app, _model(request)))


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


@routes.post(
    f"{_MODEL}/infer",
    f"{_VERSION}/infer",
    summary="Open Inference Protocol: classify images (BYTES 'image' or FP32/FP16 'pixels')",
    errors="oip",
)
async def infer_route(request: web.Request) -> web.Response:
    """Classify a batch of images sent as one input tensor."""
    started = time.monotonic()
    app = request.app
    readiness = app[READINESS]
    if not readiness.ready:
        raise NotReadyError(f"the server is not ready: {readiness.reason}")
    name = _model(request)
    timeout_s = request_timeout_s(request, app[SETTINGS].batching.request_timeout_s)

    async def read() -> InferRequest:
        body, header_length = await request.read(), _header_length(request)
        # Parsing is pure Python over up to limits.max_upload_bytes: off the loop.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            app[DECODE_POOL].executor, parse_infer_request, body, header_length
        )

    def count_images(count: int) -> None:
        request[IMAGE_COUNT] = count

    call = InferCall(
        request_id=request[REQUEST_ID],
        started=started,
        timeout_s=timeout_s,
        on_image_count=count_images,
    )
    parsed, outputs = await infer(app, call, read)
    body, header_length = encode_response(
        model_name=name, model_version=MODEL_VERSION, request_id=parsed.id, outputs=outputs
    )
    if header_length is None:
        return web.Response(body=body, content_type="application/json")
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={INFERENCE_HEADER: str(header_length)},
    )
