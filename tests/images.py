"""Real photographs (shipped inside scikit-image) and odd image files, as upload bytes."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

from PIL import Image

__all__ = ["PHOTOS", "encode", "photo", "photo_bytes"]

# Real camera photographs of different sizes and content, shipped with scikit-image's wheel.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def data_path(name: str) -> Path:
    """Path of a file in scikit-image's data folder, without importing scikit-image."""
    return Path(str(resources.files("skimage") / "data" / name))


def photo(name: str = "chelsea.png") -> Image.Image:
    """A real photograph as an RGB Pillow image."""
    with Image.open(data_path(name)) as image:
        return image.convert("RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    """Encode ``image`` to bytes in ``fmt`` (JPEG at quality 90 unless told otherwise)."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        options.setdefault("quality", 90)
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo_bytes(name: str = "chelsea.png", fmt: str = "JPEG") -> bytes:
    """A real photograph encoded as ``fmt``, ready to upload."""
    return encode(photo(name), fmt)
