"""Pixels a client sends already preprocessed: checked and shaped into model inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import BadRequestError

__all__ = ["pixels_from_values"]

_DTYPES = {"FP32": torch.float32, "FP16": torch.float16}


def pixels_from_values(
    values: bytes | Sequence[float], *, datatype: str, shape: Sequence[int], input_size: int
) -> list[torch.Tensor]:
    """``(3, input_size, input_size)`` float32 images from a ``(N, 3, H, W)`` tensor's values.

    ``values`` are raw little-endian bytes of ``datatype`` or plain numbers. Raises
    ``BadRequestError`` for a wrong shape or a value that is not finite.
    """
    expected = ["N", 3, input_size, input_size]
    if len(shape) != 4 or shape[0] < 1 or list(shape[1:]) != expected[1:]:
        raise BadRequestError(
            f"pixels must have the shape {expected} (normalised, at the model's input size), "
            f"got {list(shape)}"
        )
    dtype = _DTYPES[datatype]
    with torch.inference_mode():
        if isinstance(values, bytes):
            # A copy: frombuffer would alias the request body, which the handler lets go.
            flat = torch.frombuffer(bytearray(values), dtype=dtype)
        else:
            flat = torch.tensor(values, dtype=torch.float32)
        batch = flat.to(torch.float32).reshape(*shape)
        if not bool(torch.isfinite(batch).all()):
            raise BadRequestError("pixels must be finite numbers (no NaN or infinity)")
        # Inference tensors, as the decode pool's are: a lone image then needs no copy.
        return list(batch.unbind(0))
