"""How the forward pass runs fast: precision (autocast), and what the hardware offers."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "autocast",
    "choose_precision",
    "cpu_flags",
    "cpu_model",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def _cpuinfo_field(name: str) -> str:
    """The first ``name`` line of /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_model() -> str:
    """The CPU's model name Linux reports ("" elsewhere)."""
    return _cpuinfo_field("model name")


def choose_precision(
    requested: str, device: torch.device, flags: frozenset[str] | None = None
) -> tuple[str, str]:
    """The precision to run in, and why: ``auto`` picks what the hardware does natively."""
    if requested != "auto":
        return requested, "set by model.precision"
    if device.type == "cuda":
        return "fp16", "CUDA device: fp16 autocast runs on tensor cores"
    flags = cpu_flags() if flags is None else flags
    native = sorted({"amx_bf16", "avx512_bf16"} & flags)
    if native:
        return "bf16", f"CPU has {' and '.join(native)}: bf16 matmuls run natively"
    return "fp32", "CPU has neither AMX nor AVX512-BF16: bf16 would be emulated, and slower"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast for bf16/fp16 (weights stay fp32, so accuracy-critical ops stay fp32)."""
    if precision in _DTYPES:
        return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
    return contextlib.nullcontext()
