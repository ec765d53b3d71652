"""How the forward pass runs fast: precision (autocast) and torch.compile with fixed shapes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "autocast",
    "choose_precision",
    "compile_module",
    "compiled_graphs",
    "cpu_flags",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


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


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_module(
    module: nn.Module, *, shapes: int, cpp_wrapper: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` with inductor and weight freezing, one static graph per batch shape.

    ``cpp_wrapper`` runs each graph from C++ without the GIL (for CPU graphs).
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # One graph per batch shape; past the recompile limit dynamo would silently fall back
    # to eager for the extra shapes.
    limit = max(8, shapes + 2)
    limits = {
        name: max(getattr(dynamo_config, name), limit)
        for name in ("cache_size_limit", "recompile_limit")
        if hasattr(dynamo_config, name)
    }
    compiled = torch.compile(module, backend="inductor", dynamic=False)

    def run(batch: torch.Tensor) -> torch.Tensor:
        # torch keeps config changes in context variables, so a change made here, in the
        # loading thread, is unset in the model thread that compiles and calls: there the
        # graph was built without freezing, and ran slower. So the config goes
        # around every call, in whichever thread and context makes it. Freezing folds batch
        # norm into the convolutions and pre-packs weights for oneDNN (inference only).
        # Python's wrapper calls each fused CPU kernel holding the GIL, so a forward pass
        # in one thread stalls the event loop and any other model thread for milliseconds
        # at a time; the C++ wrapper releases the GIL for the whole graph.
        with (
            inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper),
            dynamo_config.patch(limits),
        ):
            result: torch.Tensor = compiled(batch)
        return result

    return run
