"""The model code every peer server shares: what a careful user would write for each of them.

Standalone on purpose (torch, torchvision and Pillow only): the peers run in an environment
of their own and must not borrow this server's fast paths.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

__all__ = ["PeerModel"]

_WEIGHTS = ResNet50_Weights.IMAGENET1K_V2
LABELS: list[str] = list(_WEIGHTS.meta["categories"])


def _native_bf16() -> bool:
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


class PeerModel:
    """ResNet-50 (seeded random weights), channels_last, bf16 autocast where the CPU has it."""

    def __init__(self, *, compile: bool = False, batch_sizes: tuple[int, ...] = ()) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.module: nn.Module = resnet50(weights=None)
        self.module = self.module.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.transform = _WEIGHTS.transforms()
        self.bf16 = _native_bf16()
        self.batch_sizes = batch_sizes
        self.run: Any = self.module
        if compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            self.run = torch.compile(self.module, dynamic=False)
            for size in batch_sizes or (1,):  # compile every padded shape before serving
                self.forward(torch.zeros(size, 3, 224, 224))

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Bytes to the weights' own transform of the RGB image."""
        with Image.open(io.BytesIO(data)) as image:
            tensor: torch.Tensor = self.transform(image.convert("RGB"))
        return tensor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a (N, 3, 224, 224) batch, padded to an allowed size."""
        size = batch.shape[0]
        padded = next((s for s in self.batch_sizes if s >= size), size)
        if padded > size:
            batch = torch.cat([batch, batch.new_zeros(padded - size, *batch.shape[1:])])
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            logits = self.run(batch.contiguous(memory_format=torch.channels_last))[:size]
        return torch.softmax(logits.float(), dim=1)

    @staticmethod
    def answer(row: torch.Tensor) -> dict[str, Any]:
        """The JSON answer for one image's probabilities."""
        confidence, index = row.max(dim=0)
        return {"prediction": LABELS[int(index)], "confidence": float(confidence)}
