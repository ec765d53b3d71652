"""``ModelSpec``: what the server needs to know of a model family, and nothing of how it runs.

One file per family implements it (``torchvision_spec.py`` for torchvision's classifiers), so
adding another family is one new file; the runner, the preprocessor and the HTTP layer read
only this interface.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

__all__ = ["ModelSpec"]


class ModelSpec(Protocol):
    """A model family: how to build it with given weights, its labels and its input."""

    @property
    def name(self) -> str:
        """The model's name, as logs, metrics and spans show it (``resnet50``)."""
        ...

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names, in the order of the model's outputs."""
        ...

    @property
    def weight_names(self) -> tuple[str, ...]:
        """The named weights ``model.weights`` may give, besides ``random`` and a file."""
        ...

    def input_size(self, weights: str) -> int:
        """Height and width of the square image the model takes with ``weights``."""
        ...

    def build(self, weights: str, *, seed: int) -> nn.Module:
        """The network with ``weights`` loaded; raises ``ModelLoadError`` with the fix."""
        ...

    def transform(self, weights: str) -> nn.Module:
        """The preprocessing ``weights`` were trained with (a PIL image to a tensor)."""
        ...
