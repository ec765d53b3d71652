"""The package's layers: each imports only the layers below it, and ``core`` no framework.

Read from the source with ``ast``, so a forbidden import fails here even where it would not
fail at run time (a lazy import inside a function counts too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batching_server"

# Layer -> the package's own layers it may import (itself always allowed).
ALLOWED_LAYERS: dict[str, set[str]] = {
    "core": set(),
    "protocols": {"core"},
    "preprocess": {"core"},
    "models": {"core", "preprocess", "settings"},
    "observability": {"core", "settings"},
    "http": {"core", "protocols", "preprocess", "models", "observability", "settings"},
    # Served from the app's state (readiness, decode pool, batcher) and its OIP infer path.
    "grpc": {"core", "protocols", "preprocess", "models", "observability", "settings", "http"},
    # The supervisor and a worker's entry point run the command line's module (__main__),
    # which imports the app (and torch) only inside a worker.
    "workers": {"core", "observability", "settings", "__main__"},
}
# Third-party packages a layer must not import.
FORBIDDEN_PACKAGES: dict[str, set[str]] = {
    "core": {"aiohttp", "torch", "torchvision", "PIL", "numpy", "opentelemetry", "aioprometheus"},
    "protocols": {"aiohttp", "torch", "torchvision", "PIL", "numpy", "opentelemetry"},
    "preprocess": {"aiohttp", "opentelemetry", "aioprometheus", "torchvision"},
    "models": {"aiohttp", "aioprometheus"},
    "observability": {"torch", "torchvision", "PIL", "numpy"},
    "http": {"torch", "torchvision", "PIL", "numpy"},
    "grpc": {"torch", "torchvision", "PIL", "numpy"},
    # The supervisor stays light: no torch, no CUDA context, no app of its own.
    "workers": {"torch", "torchvision", "PIL", "numpy", "aiohttp", "opentelemetry"},
}


def _imports(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    package = ["batching_server", *path.parent.relative_to(PACKAGE).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                if node.module is None:  # from . import a, b: each is a module or a name
                    names.update(f"{module}.{alias.name}" for alias in node.names)
                    continue
            else:
                module = node.module or ""
            names.add(module)
    return names


def _own_layer(name: str) -> str | None:
    """The layer (or top-level module) of one of the package's names, None for others.

    The package root (``__version__``) is below every layer.
    """
    parts = name.split(".")
    if parts[0] != "batching_server" or len(parts) == 1 or parts[1] == "__version__":
        return None
    return parts[1]


@pytest.mark.parametrize("layer", sorted(ALLOWED_LAYERS))
def test_a_layer_imports_only_what_is_below_it(layer: str) -> None:
    problems = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in sorted(_imports(path)):
            own = _own_layer(name)
            if own is not None and own != layer and own not in ALLOWED_LAYERS[layer]:
                problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
            if name.split(".")[0] in FORBIDDEN_PACKAGES[layer]:
                problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert problems == []


def test_every_module_of_the_package_is_in_a_layer_or_at_the_top() -> None:
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top <= {"__init__.py", "__main__.py", "settings.py", "settings_doc.py"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(ALLOWED_LAYERS)


def _generated(path: Path) -> bool:
    """grpcio-tools' output: its names are the .proto's."""
    return path.name.endswith(("_pb2.py", "_pb2_grpc.py"))


def test_every_module_declares_its_public_names() -> None:
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__main__.py"
        and not _generated(path)
        and "__all__" not in path.read_text(encoding="utf-8")
    ]
    assert missing == []
