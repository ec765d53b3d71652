"""torchvision classifiers as ``ModelSpec``s: building, weight loading, labels, transform."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from ..core.errors import ModelLoadError

__all__ = ["RESNET50", "TorchvisionClassifier"]


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
    default_weights: str
    input_size: int = 224

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names; they ship inside torchvision, so they are there offline too."""
        return tuple(self._named(self.default_weights).meta["categories"])

    def transform(self, weights: str) -> nn.Module:
        """The named weights' own transform; the default weights' for 'random' and files."""
        named = weights if weights in self.weights_enum.__members__ else self.default_weights
        transform: nn.Module = self._named(named).transforms()
        return transform

    def build(self, weights: str, *, seed: int) -> nn.Module:
        """The network with ``weights`` loaded; raises ``ModelLoadError`` with the fix."""
        if weights == "random":
            # Seeded so every process (and every test run) gets the same network.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.builder(weights=None)
        if weights in self.weights_enum.__members__:
            state_dict = self._download(weights)
        else:
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

    def _download(self, weights: str) -> Mapping[str, torch.Tensor]:
        named = self._named(weights)
        try:
            # torch.hub prints "Downloading: ..." to stdout, which must stay JSON lines only.
            with contextlib.redirect_stdout(sys.stderr):
                state_dict: Mapping[str, torch.Tensor] = named.get_state_dict(
                    progress=False, check_hash=True
                )
        except Exception as exc:
            raise ModelLoadError(
                f"could not obtain the {self.name} weights {weights} ({named.url}): {exc}. "
                "Fix: run once with network access so torchvision caches them under "
                f"{torch.hub.get_dir()}/checkpoints, or set model.weights to a local "
                "state_dict file, or (for tests only: predictions are meaningless) to 'random'."
            ) from exc
        return state_dict


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


RESNET50 = TorchvisionClassifier(
    name="resnet50",
    builder=resnet50,
    weights_enum=ResNet50_Weights,
    default_weights="IMAGENET1K_V2",
)
