"""The Open Inference Protocol over gRPC, called through the generated stub on the real app."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import structlog
from aiohttp import FormData, web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from batching_server.core.errors import DeadlineExceededError
from batching_server.grpc.proto import grpc_predict_v2_pb2 as pb
from batching_server.grpc.proto import grpc_predict_v2_pb2_grpc as services
from batching_server.grpc.server import GRPC_SERVER, GrpcListenError, add_grpc_server
from batching_server.grpc.servicer import InferenceServicer
from batching_server.http.app import create_app
from batching_server.http.appkeys import READINESS
from batching_server.models import RESNET50, ModelRunner
from batching_server.observability.logs import configure_logging
from batching_server.preprocess import Preprocessor
from tests.conftest import AppClient, make_settings, saturate, taken_port
from tests.fakes import SpyRunner
from tests.images import photo_bytes
from tests.metrics_text import scrape, value

CAT, COFFEE = photo_bytes("chelsea.png"), photo_bytes("coffee.png")
INFER = "/inference.GRPCInferenceService/ModelInfer"


@contextlib.asynccontextmanager
async def stub_for(client: Any) -> AsyncIterator[Any]:
    """The generated stub on a channel to the app's gRPC port."""
    port = client.app[GRPC_SERVER].port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield services.GRPCInferenceServiceStub(channel)


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def image_request(images: list[bytes], *, raw: bool = True, **fields: Any) -> pb.ModelInferRequest:
    """An infer request for ``images``: in raw_input_contents (tritonclient's way) or typed."""
    request = pb.ModelInferRequest(model_name="resnet50", **fields)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    if raw:
        request.raw_input_contents.append(length_prefixed(images))
    else:
        tensor.contents.bytes_contents.extend(images)
    return request


def floats(raw: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def test_health_metadata_and_unknown_models(app_client: AppClient) -> None:
    client = await app_client(grpc=True)
    async with stub_for(client) as stub:
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="resnet50"))).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="resnet50", version="1"))).ready
        server = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert server.name == "batching_server"
        assert {"binary_tensor_data", "classification"} <= set(server.extensions)
        model = await stub.ModelMetadata(pb.ModelMetadataRequest(name="resnet50"))
        assert (model.name, list(model.versions)) == ("resnet50", ["1"])
        assert {t.name: list(t.shape) for t in model.inputs} == {
            "image": [-1],
            "pixels": [-1, 3, 224, 224],
        }
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
            ("probabilities", "FP32", [-1, 1000])
        ]
        for call, request in [
            (stub.ModelReady, pb.ModelReadyRequest(name="resnet18")),
            (stub.ModelMetadata, pb.ModelMetadataRequest(name="resnet50", version="2")),
            (stub.ModelInfer, image_request([CAT], model_version="2")),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="resnet18"))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    samples = await scrape(client)
    load = "/inference.GRPCInferenceService/RepositoryModelLoad"
    assert value(samples, "http_requests_total", method="POST", endpoint=load, status="4xx") == 1


async def test_raw_and_typed_tensors_agree_with_rest_and_predict(app_client: AppClient) -> None:
    client = await app_client(grpc=True)
    async with stub_for(client) as stub:
        raw = await stub.ModelInfer(image_request([CAT, COFFEE], id="grpc-1"))
        typed = await stub.ModelInfer(image_request([CAT, COFFEE], raw=False))
        top3 = pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")
        top3.parameters["classification"].int64_param = 3
        ranked = await stub.ModelInfer(image_request([CAT, COFFEE], raw=False, outputs=[top3]))
        pixels = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**8)(CAT)
        from_pixels = pb.ModelInferRequest(model_name="resnet50")
        tensor = from_pixels.inputs.add(name="pixels", datatype="FP32", shape=[1, 3, 224, 224])
        tensor.contents.fp32_contents.extend(pixels.flatten().tolist())
        by_pixels = await stub.ModelInfer(from_pixels)

    # Raw in, raw out; typed in, typed out (as each client reads them).
    assert raw.id == "grpc-1"
    (output,) = raw.outputs
    assert (output.name, output.datatype, list(output.shape)) == (
        "probabilities",
        "FP32",
        [2, 1000],
    )
    assert not output.contents.fp32_contents
    from_raw = floats(raw.raw_output_contents[0])
    assert not typed.raw_output_contents
    from_typed = list(typed.outputs[0].contents.fp32_contents)
    assert from_typed == pytest.approx(from_raw, abs=1e-6)
    assert sum(from_raw[:1000]) == pytest.approx(1.0, abs=1e-4)
    assert list(by_pixels.outputs[0].contents.fp32_contents) == pytest.approx(
        from_raw[:1000], abs=1e-5
    )

    (strings,) = ranked.outputs
    assert (strings.datatype, list(strings.shape)) == ("BYTES", [2, 3])
    for row, image in enumerate((from_raw[:1000], from_raw[1000:])):
        score, index, label = strings.contents.bytes_contents[row * 3].decode().split(":", 2)
        assert int(index) == image.index(max(image))
        assert label == RESNET50.labels[int(index)]
        assert float(score) == pytest.approx(max(image), abs=1e-6)

    # The same image through REST (binary tensors, as tritonclient.http sends them) and
    # /predict.
    images = length_prefixed([CAT])
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(images)},
                }
            ]
        }
    ).encode()
    rest = await client.post(
        "/v2/models/resnet50/infer",
        data=io.BytesIO(header + images),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert rest.status == 200
    (rest_output,) = (await rest.json())["outputs"]
    assert rest_output["data"] == pytest.approx(from_raw[:1000], abs=1e-5)
    upload = FormData()
    upload.add_field("file", CAT, filename="cat.jpg")
    predicted = await (await client.post("/predict", data=upload)).json()
    cat = from_raw[:1000]
    assert predicted["prediction"] == RESNET50.labels[cat.index(max(cat))]
    assert predicted["confidence"] == pytest.approx(max(cat), abs=1e-4)


@pytest.mark.parametrize(
    ("request_fields", "code", "error_type", "message"),
    [
        (
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 22, 224]}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_request",
            "[1, 3, 22, 224]",
        ),
        (
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, -3, 224, 224]}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_request",
            "non-negative",
        ),
        (
            {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
                "raw_input_contents": [length_prefixed([b"not an image"])],
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_image",
            "not an image",
        ),
        (
            {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
                "raw_input_contents": [length_prefixed([CAT]), b"extra"],
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_request",
            "raw_input_contents holds 2 entries for 1 inputs",
        ),
        (
            {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
                "raw_input_contents": [length_prefixed([CAT])],
                "outputs": [{"name": "logits"}],
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_request",
            "unknown output 'logits'",
        ),
    ],
    ids=["bad-shape", "negative-dimension", "corrupt-image", "raw-count", "unknown-output"],
)
async def test_bad_requests_are_invalid_argument(
    app_client: AppClient,
    request_fields: dict[str, Any],
    code: grpc.StatusCode,
    error_type: str,
    message: str,
) -> None:
    client = await app_client(grpc=True)
    async with stub_for(client) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(pb.ModelInferRequest(model_name="resnet50", **request_fields))
    assert caught.value.code() == code
    assert message in (caught.value.details() or "")
    samples = await scrape(client)
    assert value(
        samples, "http_errors_total", method="POST", endpoint=INFER, error_type=error_type
    ) == (1)


async def test_a_full_queue_is_unavailable_with_a_retry_hint(
    app_client: AppClient, classifier: ModelRunner
) -> None:
    channels: list[Any] = []

    async def send(client: Any) -> Any:
        if not channels:
            port = client.app[GRPC_SERVER].port
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        return await services.GRPCInferenceServiceStub(channels[0]).ModelInfer(image_request([CAT]))

    client, spy, pending = await saturate(app_client, classifier, send=send, grpc=True)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(client)
        spy.gate.set()
        answered = await asyncio.gather(*pending)
    finally:
        spy.gate.set()
        await channels[0].close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "queue is full" in (caught.value.details() or "")
    trailing = dict(caught.value.trailing_metadata() or ())
    assert int(trailing["retry-after"]) >= 1
    assert [len(r.raw_output_contents[0]) for r in answered] == [4000, 4000]


async def test_api_keys_protect_every_method_but_the_probes(app_client: AppClient) -> None:
    client = await app_client(grpc=True, auth={"api_keys": ["key-0123456789abcdef"]})
    good = (("authorization", "Bearer key-0123456789abcdef"),)
    async with stub_for(client) as stub:
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        for metadata in [
            (),
            (("authorization", "Bearer nope"),),
            (("authorization", "key-0123456789abcdef"),),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(image_request([CAT]), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=good)).name
        answer = await stub.ModelInfer(image_request([CAT]), metadata=good)
        assert len(answer.raw_output_contents[0]) == 4000

        # A method the service lacks is refused too, before anyone is told it does not exist.
        port = client.app[GRPC_SERVER].port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unknown = channel.unary_unary("/inference.GRPCInferenceService/ModelConfig")
            for metadata, code in [
                ((), grpc.StatusCode.UNAUTHENTICATED),
                (good, grpc.StatusCode.UNIMPLEMENTED),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await unknown(b"", metadata=metadata)
                assert caught.value.code() == code
    samples = await scrape(client)
    errors = {"method": "POST", "error_type": "unauthorized"}
    assert value(samples, "http_errors_total", endpoint=INFER, **errors) == 3
    assert value(samples, "http_errors_total", endpoint="unmatched", **errors) == 1


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def json_logs() -> Iterator[Any]:
    """JSON logging into a buffer, as the server does into stdout; restored after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffer = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.handlers, root.level = saved[0], saved[1]
    structlog.reset_defaults()


async def test_each_call_gets_a_request_id_a_span_metrics_and_a_log_line(
    app_client: AppClient, spans: tuple[TracerProvider, InMemorySpanExporter], json_logs: Any
) -> None:
    provider, exporter = spans
    client = await app_client(grpc=True, tracer_provider=provider)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with stub_for(client) as stub:
        call = stub.ModelInfer(
            image_request([CAT]),
            metadata=(("x-request-id", "grpc-abc"), ("traceparent", traceparent)),
        )
        await call
        trailing = dict(await call.trailing_metadata())
        await stub.ServerLive(pb.ServerLiveRequest())
    assert trailing["x-request-id"] == "grpc-abc"

    (server,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.name == INFER  # the probe (ServerLive) is not traced
    assert format(server.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert server.attributes is not None
    assert server.attributes["rpc.method"] == "ModelInfer"
    children = {
        s.name
        for s in exporter.get_finished_spans()
        if s.parent and s.parent.span_id == server.context.span_id
    }
    assert children == {"image.preprocess", "batcher.wait"}

    (line,) = [line for line in json_logs() if line.get("route") == INFER]
    assert line["event"] == "request_completed"
    assert (line["request_id"], line["status"], line["grpc_status"]) == ("grpc-abc", 200, "OK")
    assert (line["protocol"], line["images"]) == ("grpc", 1)
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"

    samples = await scrape(client)
    labels = {"method": "POST", "status": "2xx"}
    assert value(samples, "http_requests_total", endpoint=INFER, **labels) == 1
    live = "/inference.GRPCInferenceService/ServerLive"
    assert value(samples, "http_requests_total", endpoint=live, **labels) == 1


class _Context:
    """What ``_timeout_s`` reads of a gRPC call's context."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


async def test_the_grpc_deadline_is_the_request_deadline_when_sooner(
    app_client: AppClient,
) -> None:
    client = await app_client(batching={"request_timeout_s": 30.0})
    servicer = InferenceServicer(app=client.app)
    assert servicer._timeout_s(_Context(None)) == 30.0
    assert servicer._timeout_s(_Context(0.25)) == 0.25
    assert servicer._timeout_s(_Context(120.0)) == 30.0
    with pytest.raises(DeadlineExceededError):
        servicer._timeout_s(_Context(0.0))


async def test_the_drain_answers_calls_in_flight_and_refuses_new_ones(
    aiohttp_client: Any, classifier: ModelRunner
) -> None:
    spy = SpyRunner(classifier)
    spy.gate.clear()
    app = create_app(make_settings(), runner=spy)
    add_grpc_server(app, port=0)
    client = await aiohttp_client(app)
    await app[READINESS].wait_ready()
    try:
        async with stub_for(client) as stub:
            in_flight = asyncio.ensure_future(stub.ModelInfer(image_request([CAT])))
            await spy.started.wait()
            closing = asyncio.create_task(client.close())
            for _ in range(500):  # bounded: until the drain has begun
                if not app[READINESS].ready:
                    break
                await asyncio.sleep(0.01)
            assert not app[READINESS].ready
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(image_request([CAT]), timeout=10)
            spy.gate.set()
            answer = await in_flight
            await closing
    finally:
        spy.gate.set()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(answer.raw_output_contents[0]) == 4000


async def test_a_grpc_port_in_use_fails_setup_naming_it(classifier: ModelRunner) -> None:
    with taken_port() as port:
        app = create_app(make_settings(), runner=classifier)
        add_grpc_server(app, port=port)
        runner = web.AppRunner(app)
        try:
            with pytest.raises(GrpcListenError, match=f"127.0.0.1:{port}.*oip.grpc_port"):
                await runner.setup()
        finally:
            await runner.cleanup()


async def test_too_large_is_resource_exhausted_whichever_limit_refuses_it(
    app_client: AppClient,
) -> None:
    client = await app_client(
        grpc=True, limits={"max_upload_bytes": 200_000, "max_image_pixels": 10_000}
    )
    async with stub_for(client) as stub:
        for request in [
            image_request([b"\0" * 300_000]),  # over the message size: gRPC's own refusal
            image_request([CAT]),  # a photo over limits.max_image_pixels: ours
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(request)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    samples = await scrape(client)
    assert value(
        samples, "http_errors_total", method="POST", endpoint=INFER, error_type="image_too_large"
    ) == (1)
