"""Metrics, traces and logs. They receive plain facts (sizes, durations, names), not models."""

from .logs import configure_logging
from .metrics import ServiceMetrics
from .tracing import create_tracer_provider, server_span_middleware, traced_batch_function

__all__ = [
    "ServiceMetrics",
    "configure_logging",
    "create_tracer_provider",
    "server_span_middleware",
    "traced_batch_function",
]
