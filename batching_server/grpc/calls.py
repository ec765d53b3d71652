"""What every gRPC call gets, as every HTTP request does: a request id, a server span, the
request metrics (``endpoint`` = the method's path) and one log line."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..observability.metrics import ServiceMetrics

__all__ = [
    "METHOD_LABEL",
    "REQUEST_ID_KEY",
    "SERVICE",
    "Call",
    "metadata_of",
    "record_call",
    "request_id_of",
]

log = structlog.get_logger("batching_server.access")

SERVICE = "inference.GRPCInferenceService"
REQUEST_ID_KEY = "x-request-id"
# Every gRPC call is an HTTP/2 POST: the request metrics keep their label values.
METHOD_LABEL = "POST"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


def metadata_of(invocation_metadata: Iterable[Any] | None) -> dict[str, str]:
    """The call's text metadata (binary ``-bin`` keys left out), by lower-case key."""
    found: dict[str, str] = {}
    for key, value in invocation_metadata or ():
        if isinstance(value, str):
            found[key.lower()] = value
    return found


def request_id_of(metadata: dict[str, str]) -> str:
    """The client's ``x-request-id`` when it is short and plain, else a new one."""
    given = metadata.get(REQUEST_ID_KEY, "")
    return given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


@dataclass(slots=True)
class Call:
    """One call being served: its method's path, request id and image count."""

    path: str
    request_id: str
    images: int = field(default=0)


def record_call(
    metrics: ServiceMetrics,
    call: Call,
    *,
    status: int,
    grpc_status: str,
    seconds: float,
    error_type: str | None,
) -> None:
    """Count and log one answered call; ``status`` is what REST answers for the same outcome."""
    metrics.observe_request(
        method=METHOD_LABEL,
        endpoint=call.path,
        status=status,
        seconds=seconds,
        error_type=error_type,
    )
    if status == 499:
        event = "request_cancelled"  # as HTTP logs a client that went away before its answer
    else:
        event = "request_failed" if error_type else "request_completed"
    log.info(
        event,
        request_id=call.request_id,
        method=METHOD_LABEL,
        route=call.path,
        protocol="grpc",
        status=status,
        grpc_status=grpc_status,
        duration_ms=round(seconds * 1000, 3),
        images=call.images,
        **({"error_type": error_type} if error_type else {}),
    )
