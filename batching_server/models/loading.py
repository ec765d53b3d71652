"""``load_runner``: from the model settings to a loaded, ready-to-warm ``ModelRunner``."""

from __future__ import annotations

import time

import structlog
import torch

from ..core.errors import ModelLoadError
from ..core.shapes import warmup_sizes
from ..preprocess.preprocessor import Preprocessor
from ..preprocess.transforms import resize_crop_normalize
from ..settings import BatchingSettings, LimitsSettings, ModelSettings, PreprocessSettings
from .acceleration import choose_precision
from .device_preprocess import (
    DevicePreprocessor,
    cuda_free_bytes,
    device_preprocess_enabled,
    memory_pixel_budget,
)
from .forward import ForwardPass
from .runner import ModelRunner, solo_pass_pays
from .spec import ModelSpec
from .threads import available_cores, plan_threads
from .torchvision_spec import RESNET50

__all__ = ["device_preprocessor", "load_runner", "resolve_device"]

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


def device_preprocessor(
    settings: ModelSettings,
    device: torch.device,
    *,
    spec: ModelSpec,
    preprocess: PreprocessSettings,
    limits: LimitsSettings,
) -> DevicePreprocessor | None:
    """The model thread's JPEG decoder and transform when ``preprocess.device`` puts them on
    the model's device; None when every image is preprocessed on the CPU."""
    transform = spec.transform(settings.weights)
    numbers = resize_crop_normalize(transform)
    if numbers is None or not device_preprocess_enabled(preprocess.device, device, transform):
        return None
    if preprocess.device_max_pixels:
        fixed = preprocess.device_max_pixels
        budget = lambda: fixed  # noqa: E731
    elif device.type == "cuda":
        budget = memory_pixel_budget(cuda_free_bytes(device))
    else:
        # On the CPU, device memory is the decode pool's memory: the same bound holds.
        cpu_budget = limits.max_decode_pixels_in_flight
        budget = lambda: cpu_budget  # noqa: E731
    # A JPEG the device refuses is decoded as the decode pool would have decoded it.
    fallback = Preprocessor(
        transform=transform,
        max_image_pixels=limits.max_image_pixels,
        jpeg_draft=preprocess.jpeg_draft,
        fast_resize=preprocess.fast_resize,
    )
    return DevicePreprocessor(
        numbers=numbers, device=device, fallback=fallback, pixel_budget=budget
    )


def load_runner(
    settings: ModelSettings,
    *,
    batching: BatchingSettings | None = None,
    spec: ModelSpec = RESNET50,
    niceness: int = 0,
    preprocess: PreprocessSettings | None = None,
    limits: LimitsSettings | None = None,
) -> ModelRunner:
    """Load ``spec``'s model as ``settings`` say; raises ``ModelLoadError`` with the fix.

    ``niceness`` is added to the model threads' nice value (``server.low_priority_workers``).
    ``preprocess`` and ``limits`` set up the device-side preprocessing (``preprocess.device``).
    """
    batching = batching or BatchingSettings()
    preprocess = preprocess or PreprocessSettings()
    limits = limits or LimitsSettings()
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
        device_preprocessor=device_preprocessor(
            settings, device, spec=spec, preprocess=preprocess, limits=limits
        ),
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
        preprocess_device="model" if runner.device_preprocessor else "cpu",
    )
    return runner
