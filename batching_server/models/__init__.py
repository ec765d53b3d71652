"""The model: a spec per model family, the forward pass, and the runner that owns its threads."""

from .forward import ForwardPass
from .loading import compile_runner, load_runner, resolve_device
from .runner import ImageInput, ModelRunner, Prediction, Ranked
from .spec import ModelSpec
from .threads import ThreadPlan, plan_threads
from .torchvision_spec import (
    RESNET50,
    TorchvisionClassifier,
    UnknownModelError,
    classification_models,
    torchvision_classifier,
)

__all__ = [
    "RESNET50",
    "ForwardPass",
    "ImageInput",
    "ModelRunner",
    "ModelSpec",
    "Prediction",
    "Ranked",
    "ThreadPlan",
    "TorchvisionClassifier",
    "UnknownModelError",
    "classification_models",
    "compile_runner",
    "load_runner",
    "plan_threads",
    "resolve_device",
    "torchvision_classifier",
]
