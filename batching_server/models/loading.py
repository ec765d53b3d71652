"""``load_runner``: from the model settings to a loaded, ready-to-warm ``ModelRunner``."""

from __future__ import annotations

import contextlib
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from ..core.errors import ModelLoadError
from ..core.shapes import warmup_sizes
from ..preprocess.preprocessor import Preprocessor
from ..preprocess.transforms import resize_crop_normalize
from ..settings import BatchingSettings, LimitsSettings, ModelSettings, PreprocessSettings
from .acceleration import choose_precision
from .aot import CompiledGraphs, GraphShape, device_identity, graph_key, load_graphs
from .aot import weights_identity as identify_weights
from .compile_cache import CompileCache, default_cache_dir
from .device_preprocess import (
    DevicePreprocessor,
    cuda_free_bytes,
    device_preprocess_enabled,
    memory_pixel_budget,
)
from .forward import ForwardPass
from .quantize import LazyQuantized, quantization_identity
from .runner import ModelRunner, solo_pass_pays
from .spec import ModelSpec
from .threads import available_cores, plan_threads
from .torchvision_spec import RESNET50

__all__ = [
    "GraphPlan",
    "builds_in_background",
    "cache_root",
    "compile_runner",
    "compiled_or_failed",
    "device_preprocessor",
    "graph_plan",
    "load_runner",
    "resolve_device",
]

log = structlog.get_logger(__name__)

# Where torchao's X86 quantizer and oneDNN's int8 kernels run.
_X86 = frozenset({"x86_64", "AMD64", "i686"})


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


def cache_root(setting: str) -> Path | None:
    """The folder ``model.compile_cache_dir`` names (None for no cache)."""
    if setting == "default":
        return default_cache_dir()
    return Path(setting) if setting else None


@contextlib.contextmanager
def _cache(settings: ModelSettings) -> Iterator[CompileCache]:
    root = cache_root(settings.compile_cache_dir)
    if root is not None:
        yield CompileCache(root=root)
        return
    # No cache: built into a folder that goes once the graphs are loaded.
    with tempfile.TemporaryDirectory(prefix="batching-server-compile-") as scratch:
        yield CompileCache(root=Path(scratch))


def compile_runner(
    runner: ModelRunner, settings: ModelSettings, *, batching: BatchingSettings | None = None
) -> bool:
    """Give ``runner`` the compiled graphs ``model.compile`` asks for, loaded from the cache
    or built into it (blocking: minutes for a first build on a CPU). True when it runs them;
    logs ``model_compiled`` either way, with the reason."""
    started = time.perf_counter()
    graphs, reason = _compiled_graphs(runner, settings, batching or BatchingSettings())
    if graphs is not None:
        runner.forward_pass.use_compiled(graphs)
    log.info(
        "model_compiled" if graphs is not None else "model_not_compiled",
        compile=settings.compile,
        reason=reason,
        graphs=len(graphs.graphs) if graphs is not None else 0,
        seconds=round(time.perf_counter() - started, 3),
    )
    return graphs is not None


def _builds_first(settings: ModelSettings, device: torch.device) -> bool:
    """Whether a graph missing from the cache is compiled now, rather than run eagerly."""
    # auto compiles on a GPU (seconds a shape); on a CPU a first compile takes minutes a
    # shape, so auto only loads what `batching-server compile` (or an earlier start) built,
    # and a server builds the rest in the background (builds_in_background).
    return compiled_or_failed(settings) or device.type == "cuda"


def compiled_or_failed(settings: ModelSettings) -> bool:
    """Whether the server must run compiled graphs, built before it is ready, and fail its
    start when they cannot be built: ``true`` asks for it, and int8 has no eager model with
    its answers to serve meanwhile (its eager form is fp32)."""
    return settings.compile == "true" or settings.precision == "int8"


def builds_in_background(settings: ModelSettings, device: torch.device) -> bool:
    """Whether graphs missing from the cache are built while the model serves eagerly."""
    return (
        settings.compile == "auto"
        and not _builds_first(settings, device)
        and bool(settings.compile_cache_dir)
    )


@dataclass(frozen=True, slots=True)
class GraphPlan:
    """The graphs a runner needs: each shape with how many threads may run it at once, each
    shape's cache key, and an example batch of a size."""

    forward_pass: ForwardPass
    shapes: list[tuple[GraphShape, int]]
    key: Callable[[GraphShape], dict[str, str]]
    example: Callable[[int], torch.Tensor]

    def load(self, cache: CompileCache, *, allow_build: bool) -> CompiledGraphs | None:
        """Every graph, loaded from ``cache`` or (``allow_build``) built into it first."""
        forward_pass = self.forward_pass
        network = forward_pass.network
        return load_graphs(
            network,
            cache=cache,
            shapes=self.shapes,
            key=self.key,
            example=self.example,
            precision=forward_pass.precision,
            device=forward_pass.device,
            allow_build=allow_build,
            build_from=network.quantized if isinstance(network, LazyQuantized) else None,
        )


def graph_plan(
    runner: ModelRunner, settings: ModelSettings, batching: BatchingSettings
) -> GraphPlan:
    """The graphs ``runner``'s thread plan and ``batching``'s shapes call for."""
    forward_pass = runner.forward_pass
    device = forward_pass.device
    # The thread plan's shapes: every batch size on a shared pass's threads, and a lone
    # image on the solo thread count when it gets a thread of its own.
    threads = runner.threads
    sizes = warmup_sizes(batching.max_batch_size, batching.batch_sizes)
    shapes = [(GraphShape(size, threads.threads), threads.concurrent_batches) for size in sizes]
    if solo_pass_pays(threads, batching.batch_sizes):
        shapes.append((GraphShape(1, threads.solo_threads), 1))
    weights = identify_weights(settings.weights, settings.seed)
    hardware = device_identity(device)
    input_size = runner.input_size

    # int8 graphs depend on the quantizer and the calibration photos too (only theirs: the
    # float graphs' keys stay as they were).
    quantization = (
        {"quantization": quantization_identity()} if forward_pass.precision == "int8" else {}
    )

    def key(shape: GraphShape) -> dict[str, str]:
        return (
            graph_key(
                model=runner.name,
                weights=weights,
                precision=forward_pass.precision,
                channels_last=forward_pass.channels_last,
                input_size=input_size,
                shape=shape,
                device=hardware,
            )
            | quantization
        )

    def example(size: int) -> torch.Tensor:
        batch = torch.zeros(size, 3, input_size, input_size, device=device)
        return batch.contiguous(memory_format=forward_pass.memory_format)

    return GraphPlan(forward_pass=forward_pass, shapes=shapes, key=key, example=example)


def _compiled_graphs(
    runner: ModelRunner, settings: ModelSettings, batching: BatchingSettings
) -> tuple[CompiledGraphs | None, str]:
    """The compiled graphs ``model.compile`` asks for (None: run eagerly), and why."""
    forward_pass = runner.forward_pass
    device = forward_pass.device
    if settings.compile == "false":
        return None, "model.compile is false"
    allow_build = _builds_first(settings, device)
    if not allow_build and not settings.compile_cache_dir:
        return None, "model.compile is auto on a CPU and there is no cache to load from"
    plan = graph_plan(runner, settings, batching)
    with _cache(settings) as cache:
        graphs = plan.load(cache, allow_build=allow_build)
    if graphs is None:
        return None, (
            "model.compile is auto on a CPU and the cache lacks some shape: a server builds "
            "the missing ones in the background and serves eagerly meanwhile (or run "
            "`batching-server compile` once before starting)"
        )
    return graphs, f"model.compile is {settings.compile}"


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
    if precision == "int8" and (device.type != "cpu" or platform.machine() not in _X86):
        raise ModelLoadError(
            f"model.precision is 'int8', which runs on x86 CPUs only; this model would run "
            f"on {device.type} ({platform.machine()}). Fix: set model.device to 'cpu' on an "
            "x86 machine, or choose another model.precision."
        )
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
    forward_pass = ForwardPass(
        module=module,
        device=device,
        precision=precision,
        channels_last=settings.channels_last,
        batch_sizes=batching.batch_sizes,
    )
    if precision == "int8":
        forward_pass.run_quantized(
            LazyQuantized(
                forward_pass.module,
                transform=spec.transform(settings.weights),
                memory_format=forward_pass.memory_format,
            )
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
