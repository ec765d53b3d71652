"""INT8 forward passes (``model.precision = "int8"``): static PT2E quantization for x86 CPUs.

The network is exported, observed on bundled photos run through the weights' own transform
(calibration), and converted into quantize/dequantize pairs around each convolution and
linear layer; AOTInductor then fuses each pair into oneDNN's int8 kernels (VNNI or AMX where
the CPU has them, AVX2 otherwise). One calibration serves every batch shape, so an image's
answer does not depend on the batch it shares. Only compiled graphs run fast: the converted
network runs eagerly only as the fallback for a shape nobody compiled.

torchao holds the PT2E quantization flow since torch moved it out of ``torch.ao``; it is
imported only when int8 is asked for.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from PIL import Image
from torch import nn

__all__ = [
    "CALIBRATION_PHOTOS",
    "LazyQuantized",
    "calibration_batch",
    "quantization_identity",
    "quantize_int8",
]

CALIBRATION_PHOTOS = Path(__file__).with_name("calibration")
# Names quantize_int8's choices (in the cache key): change it when they change.
_RECIPE = "x86-static-maxpool-fp32"

Transform = Callable[[Image.Image], torch.Tensor]


def _photos() -> list[Path]:
    return sorted(CALIBRATION_PHOTOS.glob("*.jpg"))


@functools.cache
def quantization_identity() -> str:
    """What fixes the int8 graphs beyond the float ones, for the compile cache's key: the
    quantizer's version and the calibration photos."""
    digest = hashlib.sha256()
    for photo in _photos():
        digest.update(photo.name.encode())
        digest.update(photo.read_bytes())
    return f"{_RECIPE}:torchao-{metadata.version('torchao')}:photos-{digest.hexdigest()[:16]}"


def calibration_batch(transform: Transform) -> torch.Tensor:
    """Every bundled photo and its mirror image, through ``transform``, as one batch."""
    tensors = []
    for path in _photos():
        with Image.open(path) as photo:
            rgb = photo.convert("RGB")
        tensors.append(transform(rgb))
        tensors.append(transform(rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    if not tensors:
        raise FileNotFoundError(f"no calibration photos in {CALIBRATION_PHOTOS}")
    return torch.stack(tensors)


def quantize_int8(
    module: nn.Module, *, calibration: torch.Tensor, memory_format: torch.memory_format
) -> nn.Module:
    """``module`` converted to static int8 (per-channel weights, per-tensor activations),
    its activation ranges observed on ``calibration``; blocking, seconds."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    batch = calibration.contiguous(memory_format=memory_format)
    # Strict (dynamo) export: a non-strict one gives every call of a module used more than
    # once (ResNet's one ReLU per block) a single source partition, which the quantizer
    # cannot annotate. The batch dimension stays dynamic, so that one calibration serves
    # every batch size.
    exported = torch.export.export(
        module,
        (batch[:2],),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        strict=True,
    )
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    # Inductor lowers an int8 max-pool to a call through Python (its proxy executor), which
    # the server's GIL-free package loader cannot make: max-pools stay fp32 (one in ResNet).
    quantizer.set_module_type_qconfig(nn.MaxPool2d, None)
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        prepared(batch)
    converted: nn.Module = convert_pt2e(prepared)
    return converted


class LazyQuantized(nn.Module):
    """The int8 network, quantized on first use: a start that loads every graph from the
    cache never calibrates. Safe to call from several threads."""

    def __init__(
        self, module: nn.Module, *, transform: Transform, memory_format: torch.memory_format
    ) -> None:
        super().__init__()
        self._float = [module]  # a list: not a submodule, so not exported twice
        self._transform = transform
        self._memory_format = memory_format
        self._lock = threading.Lock()
        self._quantized: nn.Module | None = None

    def quantized(self) -> nn.Module:
        """The converted network (calibrating it the first time)."""
        with self._lock:
            if self._quantized is None:
                self._quantized = quantize_int8(
                    self._float[0],
                    calibration=calibration_batch(self._transform),
                    memory_format=self._memory_format,
                )
            return self._quantized

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.quantized()(batch)
        return result
