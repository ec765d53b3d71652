"""Real photographs (shipped inside scikit-image) and odd image files, as upload bytes."""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from PIL import Image

__all__ = ["PHOTOS", "encode", "photo", "photo_bytes", "tiff"]

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


def tiff(
    width: int,
    height: int,
    tags: Mapping[int, Sequence[int]],
    data: bytes,
    *,
    big_endian: bool = False,
) -> bytes:
    """A one-page TIFF written tag by tag, for files Pillow's writer will not make.

    ``data`` is the only strip (or, where ``tags`` has TileWidth, the only tile), stored
    right after the header. Values are SHORTs, or LONGs where one does not fit.
    """
    order = ">" if big_endian else "<"
    chunk = (324, 325) if 322 in tags else (273, 279)  # Tile or Strip Offsets, ByteCounts
    every = {256: [width], 257: [height], chunk[0]: [8], chunk[1]: [len(data)], **tags}
    body = bytearray((b"MM" if big_endian else b"II") + struct.pack(order + "HI", 42, 0) + data)
    body += b"\0" * (len(body) % 2)  # the IFD starts on a word boundary
    struct.pack_into(order + "I", body, 4, len(body))
    spill_at = len(body) + 2 + 12 * len(every) + 4
    entries, spill = bytearray(), bytearray()
    for tag, values in sorted(every.items()):
        code, kind = ("H", 3) if max(values) < 65536 else ("I", 4)
        packed = struct.pack(order + code * len(values), *values)
        if len(packed) > 4:  # stored elsewhere, the entry holding its offset
            packed, spill = struct.pack(order + "I", spill_at + len(spill)), spill + packed
        entries += struct.pack(order + "HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
    return bytes(body + struct.pack(order + "H", len(every)) + entries + bytes(4) + spill)
