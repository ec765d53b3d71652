"""The one place that calls a JPEG decoder library: encoded bytes to uint8 RGB tensors on a device.

torchvision's ``decode_jpeg`` decodes a list of JPEGs on CUDA in one batched nvJPEG call, and
on the CPU with libjpeg-turbo, one by one (the CPU twin that CI runs). torchvision 0.29
deprecates its image decoding in favour of TorchCodec, and its Python wrapper warns on every
call; this module calls the operators that wrapper calls (the same code, without a warning
per batch), and is the one module to change when the decode moves to TorchCodec.
``tests/models/test_jpeg_decoder.py`` checks that both still agree, and fails the day
torchvision removes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torchvision.io  # noqa: F401  (loads its image operators into torch.ops.image)

__all__ = ["JpegDecoder", "TorchvisionJpegDecoder", "decoder_available"]

# torchvision.io.ImageReadMode.RGB's value: grayscale comes back with 3 channels too.
_MODE_RGB = 3


class JpegDecoder(Protocol):
    """Decodes JPEGs on a device: one (3, H, W) uint8 tensor per input, all or an exception."""

    def __call__(self, encoded: Sequence[bytes], device: torch.device) -> list[torch.Tensor]: ...


def decoder_available() -> bool:
    """Whether torchvision's JPEG operators are loaded (its wheels ship them)."""
    return hasattr(torch.ops.image, "decode_jpeg") and hasattr(torch.ops.image, "decode_jpegs_cuda")


class TorchvisionJpegDecoder:
    """torchvision's decoders: batched nvJPEG on CUDA, libjpeg-turbo on the CPU.

    One bad image fails the whole call, with no partial results (torchvision's contract):
    the caller retries the items one by one.
    """

    def __call__(self, encoded: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
        # The decoders read CPU uint8 tensors. torch warns on a read-only buffer (bytes), so
        # each file is copied once: small beside the decode.
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
        if device.type == "cuda":
            decoded: list[torch.Tensor] = torch.ops.image.decode_jpegs_cuda(
                tensors, _MODE_RGB, device
            )
            return decoded
        return [torch.ops.image.decode_jpeg(t, _MODE_RGB, False) for t in tensors]
