"""``load_runner``: from the model settings to a loaded, ready-to-warm ``ModelRunner``."""

from __future__ import annotations

import time

import structlog
import torch

from ..core.errors import ModelLoadError
from ..core.shapes import warmup_sizes
from ..settings import BatchingSettings, ModelSettings
from .acceleration import choose_precision
from .forward import ForwardPass
from .runner import ModelRunner, solo_pass_pays
from .spec import ModelSpec
from .threads import available_cores, plan_threads
from .torchvision_spec import RESNET50

__all__ = ["load_runner", "resolve_device"]

log = structlog.get_logger(__name__)


def resolve_device(requested: str) -> torch.device:
    """Map ``auto``/``cpu``/``cuda`` to a device, refusing CUDA when there is none."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "model.device is 'cuda' but no CUDA device is available to torch "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
            "Fix: run on a machine with a GPU and a CUDA build of torch, or set "
            "model.device to 'cpu' or 'auto'."
        )
    return torch.device(requested)


def _set_interop_threads(count: int) -> None:
    if count:
        try:
            torch.set_num_interop_threads(count)
        except RuntimeError as exc:  # only possible before any inter-op work has started
            log.warning("interop_threads_not_applied", requested=count, error=str(exc))


def load_runner(
    settings: ModelSettings,
    *,
    batching: BatchingSettings | None = None,
    spec: ModelSpec = RESNET50,
    niceness: int = 0,
) -> ModelRunner:
    """Load ``spec``'s model as ``settings`` say; raises ``ModelLoadError`` with the fix.

    ``niceness`` is added to the model threads' nice value (``server.low_priority_workers``).
    """
    batching = batching or BatchingSettings()
    device = resolve_device(settings.device)
    precision, why = choose_precision(settings.precision, device)
    if device.type == "cpu" and precision == "fp16":
        log.warning("slow_precision", precision=precision, reason="fp16 on CPU is emulated")
    threads = plan_threads(
        cores=available_cores(),
        device_type=device.type,
        concurrent_batches=batching.max_concurrent_batches,
        num_threads=settings.num_threads,
    )
    _set_interop_threads(settings.interop_threads)
    started = time.perf_counter()
    module = spec.build(settings.weights, seed=settings.seed)
    shapes = warmup_sizes(batching.max_batch_size, batching.batch_sizes)
    forward_pass = ForwardPass(
        module=module,
        device=device,
        precision=precision,
        channels_last=settings.channels_last,
        compile=settings.compile,
        batch_sizes=batching.batch_sizes,
        # A one-image batch on every core is one more compiled graph: dynamo guards on the
        # thread count.
        expected_graphs=len(shapes) + solo_pass_pays(threads, batching.batch_sizes),
    )
    runner = ModelRunner(
        name=spec.name,
        labels=spec.labels,
        weights=settings.weights,
        forward_pass=forward_pass,
        threads=threads,
        input_size=spec.input_size(settings.weights),
        niceness=niceness,
    )
    log.info(
        "model_loaded",
        model=spec.name,
        weights=settings.weights,
        device=str(device),
        precision=precision,
        precision_reason=why,
        channels_last=settings.channels_last,
        compile=settings.compile,
        concurrent_batches=threads.concurrent_batches,
        num_threads=threads.threads,
        solo_threads=threads.solo_threads,
        load_seconds=round(time.perf_counter() - started, 3),
        parameter_bytes=forward_pass.parameter_bytes,
    )
    return runner
