"""The service's error types and the HTTP status each one maps to, in one place."""

from __future__ import annotations

import math

__all__ = [
    "BadImageError",
    "BadRequestError",
    "BatcherClosedError",
    "DeadlineExceededError",
    "ImageTooLargeError",
    "InferenceError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelStalledError",
    "NotReadyError",
    "PayloadTooLargeError",
    "QueueFullError",
    "RequestTimeoutError",
    "ServiceError",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
]


class ServiceError(Exception):
    """An error that is the client's to see: it carries a status, a type and a safe message."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequestError(ServiceError):
    """The request is malformed: a missing field, a bad query parameter, too many files."""

    status = 400
    error_type = "bad_request"


class BadImageError(BadRequestError):
    """The upload is not an image Pillow can decode, or it is corrupt or truncated."""

    error_type = "invalid_image"


class PayloadTooLargeError(ServiceError):
    """The request body is larger than ``limits.max_upload_bytes``."""

    status = 413
    error_type = "payload_too_large"


class ImageTooLargeError(ServiceError):
    """The image declares more pixels than ``limits.max_image_pixels``."""

    status = 413
    error_type = "image_too_large"


class UnauthorizedError(ServiceError):
    """The route requires a bearer token (``auth.api_keys``) and none valid was sent."""

    status = 401
    error_type = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="batching_server"'})


class ModelNotFoundError(ServiceError):
    """The request names a model (or a version) this server does not serve."""

    status = 404
    error_type = "model_not_found"


class UnsupportedMediaTypeError(ServiceError):
    """The request body is not multipart/form-data."""

    status = 415
    error_type = "unsupported_media_type"


class QueueFullError(ServiceError):
    """The batcher's queue holds ``batching.max_queue_size`` images already."""

    status = 503
    error_type = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        # Whole seconds, at least 1, as RFC 9110 defines Retry-After.
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})
        self.retry_after_s = retry_after_s


class NotReadyError(ServiceError):
    """The model is not loaded and warmed up yet, or the server is shutting down."""

    status = 503
    error_type = "not_ready"
    # Loading and warming up take seconds, and a client that retries sooner only adds load
    # to a server that cannot answer yet.
    retry_after_s: float = 5.0

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s
        # Whole seconds, at least 1, as RFC 9110 defines Retry-After.
        super().__init__(
            message, headers={"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        )


class BatcherClosedError(NotReadyError):
    """The batcher no longer accepts work because the server is shutting down."""

    error_type = "shutting_down"
    # This process has closed its listening socket and leaves the balancer's pool, so a
    # prompt retry reaches another replica.
    retry_after_s = 1.0


class ModelStalledError(NotReadyError):
    """A forward pass hung: this process serves no more and exits to be restarted."""

    error_type = "model_stalled"
    # The process exits now; its replacement needs a model load and a warm-up, so a
    # retry to this address is worth waiting longer for than a plain not_ready.
    retry_after_s = 10.0


class DeadlineExceededError(ServiceError):
    """The request did not finish within its deadline (``batching.request_timeout_s``)."""

    status = 504
    error_type = "deadline_exceeded"


class RequestTimeoutError(ServiceError):
    """The client did not send its whole request body within the request's deadline."""

    status = 408
    error_type = "request_timeout"


class InferenceError(ServiceError):
    """The forward pass failed for the batch this request was part of."""

    status = 500
    error_type = "inference_failed"


class ModelLoadError(Exception):
    """The model or its weights could not be loaded; the message names the fix."""
