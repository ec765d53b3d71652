"""gRPC status codes for the service's errors, whose HTTP statuses are defined in one place
(``core/errors.py``)."""

from __future__ import annotations

import grpc

from ..core.errors import ServiceError

__all__ = ["RETRY_AFTER", "status_code", "trailing_metadata"]

# A 503's hint, in whole seconds as HTTP's Retry-After; gRPC has no standard key that
# applications may send (grpc-retry-pushback-ms is the library's own).
RETRY_AFTER = "retry-after"

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,  # a method this server does not offer
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    # What gRPC itself answers for a message over grpc.max_receive_message_length, so a client
    # sees one code for "too large" whichever of the two limits refused it.
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code of an error that REST answers with ``http_status``."""
    return _CODES.get(http_status, grpc.StatusCode.UNKNOWN)


def trailing_metadata(error: ServiceError) -> tuple[tuple[str, str], ...]:
    """The retry hint of a 503 (queue full, not ready, shutting down), as trailing metadata."""
    retry_after = error.headers.get("Retry-After")
    return ((RETRY_AFTER, retry_after),) if retry_after is not None else ()
