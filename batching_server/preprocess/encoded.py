"""JPEGs that stay encoded until the model's device decodes them: which ones, and what they carry.

The HTTP side has already parsed the header (format, size, pixel limit) with ``open_image``;
what is left to decide here reads only that header, never a pixel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from PIL import ExifTags, Image

__all__ = ["EncodedJpeg", "encoded_jpeg"]

# End Of Image: a file cut short lacks it. libjpeg-turbo only warns on a truncated file and
# returns the missing rows grey, where the CPU path refuses it (400), so such a file takes
# the CPU path. A file with bytes after its EOI (some cameras append a trailer) also does:
# harmless, it is decoded as it always was.
_EOI = b"\xff\xd9"


@dataclass(frozen=True, slots=True)
class EncodedJpeg:
    """A checked baseline JPEG, still encoded; decoded on the model's device with its batch."""

    data: bytes
    width: int  # as stored, before the EXIF orientation
    height: int
    orientation: int = 1  # EXIF orientation (1: upright; 2-8 as in the EXIF standard)

    @property
    def pixels(self) -> int:
        """Pixels the decode will produce."""
        return self.width * self.height


def encoded_jpeg(image: Image.Image, data: bytes) -> EncodedJpeg | None:
    """``data`` as an ``EncodedJpeg`` when the device decoder takes it, else None (CPU path).

    ``image`` is ``data`` opened by ``open_image`` without a draft: its header is checked,
    no pixel is decoded. Taken: plain JPEGs (not multi-picture), 8-bit RGB or greyscale,
    sequential (not progressive), whole (ending in EOI). CMYK and progressive files, which
    GPU decoders refuse or decode in part on the CPU, keep the CPU path.
    """
    if (
        image.format != "JPEG"
        or image.mode not in ("RGB", "L")
        or image.info.get("progressive")
        or not data.endswith(_EOI)
    ):
        return None
    width, height = image.size
    return EncodedJpeg(data, width, height, _orientation(image))


def _orientation(image: Image.Image) -> int:
    # As decode.py's exif_transpose reads it: a broken EXIF block means pixels as stored.
    orientation = 1
    with contextlib.suppress(Exception):
        orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
    return orientation if 1 <= orientation <= 8 else 1
