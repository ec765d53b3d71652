"""The 503s a client can retry say when: Retry-After, in whole seconds, on each of them."""

from __future__ import annotations

import pytest

from batching_server.core.errors import (
    BatcherClosedError,
    ModelStalledError,
    NotReadyError,
    QueueFullError,
)


@pytest.mark.parametrize(
    ("error", "error_type", "retry_after"),
    [
        pytest.param(NotReadyError("warming up"), "not_ready", "5", id="not-ready"),
        pytest.param(BatcherClosedError("draining"), "shutting_down", "1", id="shutting-down"),
        pytest.param(ModelStalledError("hung"), "model_stalled", "10", id="model-stalled"),
        pytest.param(
            NotReadyError("warming up", retry_after_s=0.2), "not_ready", "1", id="at-least-1"
        ),
        pytest.param(QueueFullError("full", retry_after_s=2.5), "queue_full", "3", id="queue-full"),
    ],
)
def test_every_retryable_503_carries_a_retry_after(
    error: NotReadyError | QueueFullError, error_type: str, retry_after: str
) -> None:
    assert error.status == 503
    assert error.error_type == error_type
    assert error.headers == {"Retry-After": retry_after}
