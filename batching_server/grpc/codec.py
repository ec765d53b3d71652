"""``ModelInferRequest`` to the protocol's plain ``InferRequest``, and output tensors back to a
``ModelInferResponse``: tensors in ``raw_input_contents`` (as tritonclient sends them) or in
typed ``contents``, answered the same way they came."""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence

from ..protocols.oip import (
    InferRequest,
    InputTensor,
    OutputTensor,
    ProtocolError,
    RequestedOutput,
    raw_contents,
)
from .proto import grpc_predict_v2_pb2 as pb

__all__ = ["infer_request", "infer_response"]


def _shape(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    if any(d < 0 for d in tensor.shape):
        raise ProtocolError(
            f"input {tensor.name!r}: shape must hold non-negative integers, "
            f"got {list(tensor.shape)}"
        )
    return tuple(tensor.shape)


def _typed(tensor: pb.ModelInferRequest.InferInputTensor) -> InputTensor:
    """An input sent in typed ``contents``."""
    shape, contents = _shape(tensor), tensor.contents
    if tensor.datatype == "BYTES":
        return InputTensor(tensor.name, "BYTES", shape, data=list(contents.bytes_contents))
    if tensor.datatype == "FP32":
        values = array.array("f", contents.fp32_contents)
        if sys.byteorder != "little":
            values.byteswap()
        return InputTensor(tensor.name, "FP32", shape, raw=values.tobytes())
    if tensor.datatype == "FP16":
        raise ProtocolError(
            f"input {tensor.name!r}: FP16 has no typed contents; send it in raw_input_contents"
        )
    # Refused with the accepted datatypes named, where the input is read.
    return InputTensor(tensor.name, tensor.datatype, shape, data=[])


def _classification(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    if "classification" not in output.parameters:
        return 0
    parameter = output.parameters["classification"]
    if parameter.WhichOneof("parameter_choice") != "int64_param" or parameter.int64_param < 0:
        raise ProtocolError(
            f"output {output.name!r}: classification must be a non-negative int64_param"
        )
    return int(parameter.int64_param)


def infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """The request as the protocol's plain data; ``ProtocolError`` for what it does not allow."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise ProtocolError(
            f"raw_input_contents holds {len(raw)} entries for {len(message.inputs)} inputs; "
            "send one per input, in order"
        )
    if raw:
        inputs = [
            InputTensor(tensor.name, tensor.datatype, _shape(tensor), raw=contents)
            for tensor, contents in zip(message.inputs, raw, strict=True)
        ]
    else:
        inputs = [_typed(tensor) for tensor in message.inputs]
    binary = bool(raw)
    outputs = [
        RequestedOutput(output.name, binary, _classification(output)) for output in message.outputs
    ]
    return InferRequest(message.id or None, inputs, outputs, binary_output=binary)


def infer_response(
    *, model_name: str, model_version: str, request_id: str | None, outputs: Sequence[OutputTensor]
) -> pb.ModelInferResponse:
    """The response: binary outputs in ``raw_output_contents``, the others in ``contents``."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id or ""
    )
    for output in outputs:
        tensor = response.outputs.add(
            name=output.name, datatype=output.datatype, shape=list(output.shape)
        )
        if output.binary:
            response.raw_output_contents.append(raw_contents(output))
        elif output.datatype == "BYTES":
            tensor.contents.bytes_contents.extend(item.encode("utf-8") for item in output.data)
        else:
            tensor.contents.fp32_contents.extend(output.data)
    return response
