"""The Open Inference Protocol (KServe v2) over REST: infer requests and responses.

JSON tensors and the binary tensor data extension (``Inference-Header-Content-Length``: the
JSON header, then each binary tensor's bytes in order), and the classification extension's
``"score:index:label"`` strings. Plain data in and out: no HTTP, no torch.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

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
    "raw_contents",
]

INFERENCE_HEADER = "Inference-Header-Content-Length"
# Bytes per element of the datatypes this server reads or writes in binary.
_ELEMENT_BYTES = {"FP32": 4, "FP16": 2}
_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """The request breaks the protocol; the message says how (a 400 for the client)."""


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input: its JSON ``data`` (flattened, row-major) or its binary bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[Any] | None = None
    raw: bytes | None = None

    @property
    def elements(self) -> int:
        """How many elements the shape holds."""
        return math.prod(self.shape)

    def bytes_elements(self) -> list[bytes]:
        """The elements of a BYTES tensor: length-prefixed in binary, strings in JSON, bytes in
        gRPC's typed contents."""
        if self.datatype != "BYTES":
            raise ProtocolError(f"input {self.name!r} must be BYTES, got {self.datatype}")
        if self.raw is not None:
            # One more than the shape holds, at most: a body of a million tiny elements under
            # a shape of one is refused without walking them all.
            items = list(itertools.islice(_length_prefixed(self.raw, self.name), self.elements + 1))
        else:
            assert self.data is not None
            if all(isinstance(item, bytes) for item in self.data):  # gRPC's bytes_contents
                items = list(self.data)
            elif all(isinstance(item, str) for item in self.data):  # JSON strings
                items = [item.encode("utf-8", "surrogateescape") for item in self.data]
            else:
                raise ProtocolError(f"input {self.name!r}: BYTES elements must be strings")
        if len(items) != self.elements:
            raise ProtocolError(
                f"input {self.name!r} has {len(items)} elements, its shape "
                f"{list(self.shape)} holds {self.elements}"
            )
        return items

    def numbers(self) -> bytes | list[float]:
        """The elements of an FP32 or FP16 tensor: raw little-endian bytes, or JSON numbers."""
        size = _ELEMENT_BYTES.get(self.datatype)
        if size is None:
            raise ProtocolError(f"input {self.name!r} must be FP32 or FP16, got {self.datatype}")
        if self.raw is not None:
            if len(self.raw) != self.elements * size:
                raise ProtocolError(
                    f"input {self.name!r}: {len(self.raw)} bytes of binary data, its shape "
                    f"{list(self.shape)} of {self.datatype} needs {self.elements * size}"
                )
            return self.raw
        assert self.data is not None
        if len(self.data) != self.elements or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in self.data
        ):
            raise ProtocolError(
                f"input {self.name!r}: data must be {self.elements} numbers for the shape "
                f"{list(self.shape)}"
            )
        return [float(v) for v in self.data]


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for: in binary or not, and as top-``classification``."""

    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A parsed infer request."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput]
    # The request-level default for outputs not listed (tritonclient sets it when it lists none).
    binary_output: bool = False


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output to send: JSON ``data``, or ``raw`` bytes when ``binary``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[Any] = field(default_factory=list)
    raw: bytes = b""
    binary: bool = False


def _length_prefixed(raw: bytes, name: str) -> Iterator[bytes]:
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element's 4-byte length is cut short")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element runs past the binary data")
        yield raw[offset : offset + length]
        offset += length


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: data must be an array")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested array must not exhaust the recursion limit
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, Mapping):
        raise ProtocolError(f"{where}: parameters must be an object")
    return parameters


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise ProtocolError(f"input {name!r}: shape must be an array of non-negative integers")
    return tuple(value)


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse an infer request body; ``header_length`` is the JSON part's length, if given.

    Raises ``ProtocolError`` for anything the protocol does not allow.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise ProtocolError(
                f"{INFERENCE_HEADER} is {header_length}, the body has {len(body)} bytes"
            )
        header, binary = body[:header_length], body[header_length:]
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("inputs must be a non-empty array")
    inputs, offset = [], 0
    for raw in raw_inputs:
        if not isinstance(raw, dict):
            raise ProtocolError("each input must be an object")
        name, datatype = raw.get("name"), raw.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise ProtocolError("each input needs a string name and datatype")
        shape = _shape(raw.get("shape"), name)
        size = _parameters(raw, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size must be an integer")
            if offset + size > len(binary):
                raise ProtocolError(
                    f"input {name!r}: binary_data_size {size} runs past the binary data"
                )
            inputs.append(InputTensor(name, datatype, shape, raw=binary[offset : offset + size]))
            offset += size
        elif "data" in raw:
            inputs.append(InputTensor(name, datatype, shape, data=_flatten(raw["data"], name)))
        else:
            raise ProtocolError(f"input {name!r} has neither data nor binary_data_size")
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    top = _parameters(request, "the request")
    binary_output = top.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError("binary_data_output must be true or false")
    outputs = []
    raw_outputs = request.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise ProtocolError("outputs must be an array")
    for raw in raw_outputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ProtocolError("each output must be an object with a string name")
        parameters = _parameters(raw, f"output {raw['name']!r}")
        wants_binary = parameters.get("binary_data", binary_output)
        count = parameters.get("classification", 0)
        if not isinstance(wants_binary, bool):
            raise ProtocolError(f"output {raw['name']!r}: binary_data must be true or false")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ProtocolError(
                f"output {raw['name']!r}: classification must be a non-negative integer"
            )
        outputs.append(RequestedOutput(raw["name"], wants_binary, count))
    return InferRequest(request_id, inputs, outputs, binary_output)


def classification_strings(
    ranked: Sequence[tuple[str, float]], indices: Sequence[int]
) -> list[str]:
    """The classification extension's ``"score:index:label"`` for each ranked class."""
    return [
        f"{score:f}:{index}:{label}" for (label, score), index in zip(ranked, indices, strict=True)
    ]


def _bytes_raw(items: Sequence[str]) -> bytes:
    parts = []
    for item in items:
        encoded = item.encode("utf-8")
        parts += [_LENGTH.pack(len(encoded)), encoded]
    return b"".join(parts)


def raw_contents(output: OutputTensor) -> bytes:
    """An output's bytes in binary: little-endian numbers, or length-prefixed BYTES elements."""
    return output.raw if output.datatype != "BYTES" else _bytes_raw(output.data)


def encode_response(
    *, model_name: str, model_version: str, request_id: str | None, outputs: Sequence[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when any output is binary."""
    described, binary = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if output.binary:
            raw = raw_contents(output)
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = output.data
        described.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": described,
    }
    if request_id is not None:
        response["id"] = request_id
    header = orjson.dumps(response)
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)
