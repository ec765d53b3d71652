"""ResNet-50 image classification over HTTP, with dynamic request batching."""

__version__ = "0.2.0"

__all__ = ["__version__"]
