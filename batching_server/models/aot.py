"""Ahead-of-time compiled forward passes: AOTInductor packages, built once, cached on disk.

Each (batch shape, torch thread count) the server can run is exported with ``torch.export``
and compiled by AOTInductor (weight freezing on) into one ``.pt2`` package, kept in a
``CompileCache`` entry keyed by everything that changes the generated code. A later start
loads the package instead of compiling: no dynamo tracing, no C++ compiler.

Why not ``torch.compile`` with inductor's own caches: on CPU, freezing pre-packs the weights
for oneDNN, and inductor's FX-graph cache refuses such graphs ("mkldnn tensors unpickleable"),
so every start traced and compiled every shape again.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import tempfile
import threading
import time
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
import torchvision
from torch import nn

from .acceleration import autocast, cpu_flags, cpu_model
from .compile_cache import CompileCache, file_digest

__all__ = [
    "CompiledGraphs",
    "GraphShape",
    "build_package",
    "device_identity",
    "graph_key",
    "graph_label",
    "load_graphs",
    "load_package",
    "weights_identity",
]

log = structlog.get_logger(__name__)

Graph = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True, order=True)
class GraphShape:
    """One compiled graph: a batch size, and the torch thread count its CPU code was built
    for (OpenMP loops in inductor's C++ kernels are generated for a fixed team size)."""

    batch_size: int
    threads: int


def weights_identity(weights: str, seed: int) -> str:
    """What the weights are, for the key: frozen weights are compiled into the package."""
    if weights == "random":
        return f"random:seed={seed}"
    path = Path(weights)
    if path.is_file():
        return f"file-sha256:{file_digest(path)}"
    return f"named:{weights}"


def device_identity(device: torch.device) -> str:
    """The hardware the generated code is specific to: GPU model and capability, or the CPU
    model and its feature flags (inductor picks its vector ISA from them)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        return f"cuda:{name}:sm_{major}{minor}:cuda-{torch.version.cuda}"
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    return f"cpu:{cpu_model()}:flags-{flags}"


def graph_label(shape: GraphShape) -> str:
    """A shape's readable name, in its cache entry's folder name and in the logs."""
    return f"b{shape.batch_size}-t{shape.threads}"


def graph_key(
    *,
    model: str,
    weights: str,
    precision: str,
    channels_last: bool,
    input_size: int,
    shape: GraphShape,
    device: str,
) -> dict[str, str]:
    """Every field that changes a compiled graph, as strings (the manifest's ``key``)."""
    return {
        "model": model,
        "weights": weights,
        "precision": precision,
        "channels_last": str(channels_last).lower(),
        "input": f"{shape.batch_size}x3x{input_size}x{input_size}",
        "threads": str(shape.threads),
        "device": device,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


class _Autocast(nn.Module):
    """The network run under autocast, so that export records the casts into the graph."""

    def __init__(self, module: nn.Module, *, precision: str, device: torch.device) -> None:
        super().__init__()
        self.module = module
        self.precision = precision
        self.device = device

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            result: torch.Tensor = self.module(batch)
        return result


def build_package(
    module: nn.Module,
    example: torch.Tensor,
    *,
    precision: str,
    device: torch.device,
    threads: int,
    path: Path,
) -> None:
    """Export ``module`` for ``example``'s shape and layout, compile it, write ``path``."""
    from torch._inductor import aoti_compile_and_package

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the team size the C++ kernels are generated for
    try:
        with torch.inference_mode():
            program = torch.export.export(
                _Autocast(module, precision=precision, device=device), (example,)
            )
        # Freezing folds batch norm into the convolutions and pre-packs weights for oneDNN
        # (the weights are then in the package: hence the weights in the key). Inductor
        # freezes only with gradients off at compile time; with them on it quietly did not.
        with torch.no_grad(), warnings.catch_warnings():
            # Inductor's own int8 weight lowering copy-constructs a tensor (its warning,
            # not ours to fix; warnings are errors under the tests).
            warnings.filterwarnings(
                "ignore", message="To copy construct from a tensor", category=UserWarning
            )
            aoti_compile_and_package(
                program,
                package_path=str(path),
                inductor_configs={"freezing": True, "aot_inductor.package_constants_in_so": True},
            )
    finally:
        torch.set_num_threads(previous)


class _CpuContainer:
    """An AOTInductor model container called through its C interface (``interface.h``).

    The Python loader holds the GIL for a whole forward pass (pytorch/pytorch#197516),
    which would stop the event loop, the decode threads and the other model thread for as
    long; ctypes releases the GIL around each foreign call.
    """

    def __init__(self, package: Path, *, concurrent: int) -> None:
        with zipfile.ZipFile(package) as archive:
            libraries = [n for n in archive.namelist() if n.endswith(".so")]
            if len(libraries) != 1:
                raise RuntimeError(f"expected one shared library in the package, found {libraries}")
            _refuse_python_operators(archive)
            with tempfile.TemporaryDirectory(prefix="batching-server-aot-") as scratch:
                library = Path(archive.extract(libraries[0], scratch))
                # Once loaded, the mapping outlives the file.
                self._lib = ctypes.CDLL(str(library))
        handle = ctypes.c_void_p()
        self._check(
            self._lib.AOTInductorModelContainerCreateWithDevice(
                ctypes.byref(handle), ctypes.c_size_t(concurrent), b"cpu", None
            ),
            "create the model container",
        )
        self._handle = handle
        outputs = ctypes.c_size_t()
        self._check(
            self._lib.AOTInductorModelContainerGetNumOutputs(handle, ctypes.byref(outputs)),
            "count the outputs",
        )
        self._outputs = outputs.value
        weakref.finalize(self, self._lib.AOTInductorModelContainerDelete, handle)

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"AOTInductor could not {what} (error {code})")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # Handles to new references of the input; Run steals them, and hands over its outputs.
        handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([batch])
        inputs = [_capsule_pointer(handle) for handle in handles]
        input_array = (ctypes.c_void_p * 1)(*inputs)
        output_array = (ctypes.c_void_p * self._outputs)()
        self._check(
            self._lib.AOTInductorModelContainerRun(
                self._handle,
                input_array,
                ctypes.c_size_t(1),
                output_array,
                ctypes.c_size_t(self._outputs),
                None,
                None,
            ),
            "run the forward pass",
        )
        # The stubs say c_void_p; the binding takes the capsules it hands out.
        capsules: Any = [_new_capsule(output_array[i]) for i in range(self._outputs)]
        result: torch.Tensor = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(capsules)[0]
        return result


def _refuse_python_operators(archive: zipfile.ZipFile) -> None:
    """Operators with no C kernel are called through a proxy executor, in Python, which only
    torch's own loader provides: such a package would fail at its first forward pass."""
    for name in archive.namelist():
        if name.endswith(".wrapper.json"):
            nodes = json.loads(archive.read(name)).get("nodes") or []
            if nodes:
                targets = sorted({str(node["node"]["target"]) for node in nodes})
                raise RuntimeError(
                    "the compiled graph calls operators through Python, which this loader "
                    f"cannot: {', '.join(targets)}"
                )


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_new_capsule_c = ctypes.pythonapi.PyCapsule_New
_new_capsule_c.restype = ctypes.py_object
_new_capsule_c.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _capsule_pointer(capsule: object) -> int:
    pointer: int = _get_pointer(capsule, None)
    return pointer


def _new_capsule(pointer: int | None) -> object:
    return _new_capsule_c(pointer, None, None)


def load_package(package: Path, *, device: torch.device, concurrent: int) -> Graph:
    """A callable forward pass from a package, for up to ``concurrent`` threads at once."""
    if device.type == "cpu":
        return _CpuContainer(package, concurrent=concurrent)
    from torch._inductor import aoti_load_package

    loaded = aoti_load_package(str(package), device_index=device.index or 0)

    def run(batch: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = loaded(batch)
        return result

    return run


class CompiledGraphs:
    """The loaded graphs, picked per call by the batch size and the calling thread's torch
    thread count; a shape without a graph runs ``fallback`` (eager) and is counted."""

    def __init__(self, graphs: Mapping[GraphShape, Graph], *, fallback: Graph) -> None:
        self.graphs = dict(graphs)
        self._fallback = fallback
        self._lock = threading.Lock()
        self._missing: set[GraphShape] = set()
        self.fallbacks = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        shape = GraphShape(batch.shape[0], torch.get_num_threads())
        graph = self.graphs.get(shape)
        if graph is not None:
            return graph(batch)
        with self._lock:
            self.fallbacks += 1
            first = shape not in self._missing
            self._missing.add(shape)
        if first:
            # Every shape the batcher sends was compiled, so this is a caller's odd thread
            # count or size: loud once, as each such pass runs at eager speed.
            log.warning(
                "compiled_graph_missing",
                batch_size=shape.batch_size,
                threads=shape.threads,
                compiled=sorted((g.batch_size, g.threads) for g in self.graphs),
            )
        return self._fallback(batch)


def load_graphs(
    module: nn.Module,
    *,
    cache: CompileCache,
    shapes: Iterable[tuple[GraphShape, int]],
    key: Callable[[GraphShape], dict[str, str]],
    example: Callable[[int], torch.Tensor],
    precision: str,
    device: torch.device,
    allow_build: bool = True,
    load: Callable[[Path], Graph] | None = None,
    build_from: Callable[[], nn.Module] | None = None,
) -> CompiledGraphs | None:
    """Every shape's graph, loaded from ``cache`` or built into it (progress in the logs).

    ``shapes`` pairs each shape with how many threads may run it at once. None when
    ``allow_build`` is false and some entry is missing or unusable. ``load`` replaces
    ``load_package`` (a process that only builds need not load). ``build_from`` gives the
    network to export when it is not ``module`` itself (int8: its quantized form, made only
    when a graph must be built); ``module`` runs the shapes nobody compiled.
    """
    graphs: dict[GraphShape, Graph] = {}
    planned = sorted(shapes)
    started = time.perf_counter()
    for number, (shape, concurrent) in enumerate(planned, 1):
        label = graph_label(shape)
        shape_started = time.perf_counter()

        def build(path: Path, shape: GraphShape = shape, number: int = number) -> None:
            log.info(
                "compiling_graph",
                graph=f"{number}/{len(planned)}",
                batch_size=shape.batch_size,
                threads=shape.threads,
            )
            build_package(
                build_from() if build_from is not None else module,
                example(shape.batch_size),
                precision=precision,
                device=device,
                threads=shape.threads,
                path=path,
            )

        found = cache.get(
            label,
            key(shape),
            build=build,
            load=load or functools.partial(load_package, device=device, concurrent=concurrent),
            allow_build=allow_build,
        )
        if found is None:
            return None
        graphs[shape] = found.value
        log.info(
            "compiled_graph_built" if found.built else "compiled_graph_loaded",
            graph=f"{number}/{len(planned)}",
            batch_size=shape.batch_size,
            threads=shape.threads,
            seconds=round(time.perf_counter() - shape_started, 3),
            total_seconds=round(time.perf_counter() - started, 3),
            entry=str(found.path),
        )
    return CompiledGraphs(graphs, fallback=module)
