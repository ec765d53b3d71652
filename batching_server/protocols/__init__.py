"""Request decoding and response encoding per protocol, apart from HTTP and from the model."""

from .oip import (
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

__all__ = [
    "INFERENCE_HEADER",
    "InferRequest",
    "InputTensor",
    "OutputTensor",
    "ProtocolError",
    "RequestedOutput",
    "classification_strings",
    "encode_response",
    "parse_infer_request",
]
