"""torchvision's image classifiers as ``ModelSpec``s: building, weight loading, labels, transform.

Every classification model of ``torchvision.models`` fits one shape (a builder, a weights enum
whose members carry their categories and their own transform), so one class serves them all.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torchvision.models
from torch import nn

from ..core.errors import ModelLoadError

__all__ = [
    "RESNET50",
    "TorchvisionClassifier",
    "UnknownModelError",
    "classification_models",
    "closest_models",
    "model_choices",
    "torchvision_classifier",
]


class UnknownModelError(ValueError):
    """The name is not one of torchvision's classification models; the message lists some."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TorchvisionClassifier:
    """One torchvision classification model: its builder and its weights enum.

    ``weights`` is a member name of the enum (downloaded once into torch's hub cache),
    ``"random"`` (seeded, for tests and benchmarks: predictions are meaningless), or the path
    of a ``state_dict`` file.
    """

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type[Enum]
    # Whose transform and labels a 'random' or file-loaded network uses.
    default_weights: str = "DEFAULT"

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names; they ship inside torchvision, so they are there offline too."""
        return tuple(self._named(self.default_weights).meta["categories"])

    @property
    def weight_names(self) -> tuple[str, ...]:
        """The names ``model.weights`` may give (``DEFAULT`` included)."""
        return tuple(self.weights_enum.__members__)

    def transform(self, weights: str) -> nn.Module:
        """The named weights' own transform; the default weights' for 'random' and files."""
        transform: nn.Module = self._named(self._transform_weights(weights)).transforms()
        return transform

    def input_size(self, weights: str) -> int:
        """The side of the square crop ``weights``' transform hands the network."""
        crop: list[int] = self._named(self._transform_weights(weights)).transforms().crop_size
        return crop[0]

    def _transform_weights(self, weights: str) -> str:
        return weights if weights in self.weights_enum.__members__ else self.default_weights

    def build(self, weights: str, *, seed: int) -> nn.Module:
        """The network with ``weights`` loaded; raises ``ModelLoadError`` with the fix."""
        if weights == "random":
            # Seeded so every process (and every test run) gets the same network.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.builder(weights=None)
        if weights in self.weights_enum.__members__:
            return self._pretrained(weights)
        state_dict = _state_dict_from_file(Path(weights), self.name)
        module = self.builder(weights=None)
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"the weights {weights!r} do not fit torchvision's {self.name}: "
                f"{str(exc).splitlines()[0]}... Fix: use a state_dict of "
                f"torchvision.models.{self.name}."
            ) from exc
        return module

    def _named(self, weights: str) -> Any:
        return self.weights_enum[weights]

    def _pretrained(self, weights: str) -> nn.Module:
        named = self._named(weights)
        try:
            # The builder itself loads named weights (hash-checked), so whatever it adapts
            # for them (class count, auxiliary heads, input transform) is set as torchvision
            # means. torch.hub prints "Downloading: ..." to stdout, which must stay JSON lines.
            with contextlib.redirect_stdout(sys.stderr):
                return self.builder(weights=named, progress=False)
        except Exception as exc:
            raise ModelLoadError(
                f"could not obtain the {self.name} weights {weights} ({named.url}): {exc}. "
                "Fix: run once with network access so torchvision caches them under "
                f"{torch.hub.get_dir()}/checkpoints, or set model.weights to a local "
                "state_dict file, or (for tests only: predictions are meaningless) to 'random'."
            ) from exc


def _state_dict_from_file(path: Path, model_name: str) -> Mapping[str, torch.Tensor]:
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"could not read the state_dict file {str(path)!r}: {exc}. Fix: point "
            "model.weights at a file saved with torch.save(model.state_dict(), path)."
        ) from exc
    # Training checkpoints often wrap the weights; DataParallel prefixes every key.
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a state_dict. Fix: save "
            f"torch.save(model.state_dict(), path) for a torchvision {model_name}."
        )
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


@functools.cache
def classification_models() -> tuple[str, ...]:
    """The names of torchvision's image classification models, sorted."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def closest_models(name: str, count: int = 5) -> list[str]:
    """The classification models whose names are closest to ``name``, closest first."""
    return difflib.get_close_matches(name, classification_models(), n=count, cutoff=0.3)


def model_choices(name: str) -> str:
    """Every valid model name, those closest to ``name`` first, for an error message."""
    closest = closest_models(name)
    others = [m for m in classification_models() if m not in closest]
    return f"closest: {', '.join(closest) or 'none'}; the others: {', '.join(others)}"


def torchvision_classifier(name: str) -> TorchvisionClassifier:
    """The spec of torchvision's classification model ``name``.

    Raises ``UnknownModelError`` naming the closest valid names for any other name.
    """
    if name not in classification_models():
        raise UnknownModelError(
            f"{name!r} is not one of torchvision's classification models; {model_choices(name)}"
        )
    return TorchvisionClassifier(
        name=name,
        builder=torchvision.models.get_model_builder(name),
        weights_enum=torchvision.models.get_model_weights(name),
    )


RESNET50 = torchvision_classifier("resnet50")
