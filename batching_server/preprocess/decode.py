"""Image bytes to an upright RGB Pillow image: format sniffing, pixel limit, decode, EXIF.

Runs in the decode threads, never on the event loop: Pillow releases the GIL while it decodes.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from typing import cast

import numpy as np
from PIL import Image, ImageChops, ImageOps, TiffImagePlugin, UnidentifiedImageError, _imaging

from ..core.errors import BadImageError, ImageTooLargeError

__all__ = [
    "ACCEPTED_FORMATS",
    "DRAFT_MARGIN",
    "IMAGE_BLOCK_BYTES",
    "MAX_ASPECT",
    "PEAK_BYTES_PER_PIXEL",
    "TIFF_COMPRESSIONS",
    "apply_draft",
    "decode_image",
    "limit_aspect",
    "load_rgb",
    "open_image",
]

# Formats a camera, phone or browser produces. Leaving out the rest (EPS, for one, shells
# out to Ghostscript) keeps Pillow's least-audited decoders away from untrusted bytes.
# Phones' multi-picture JPEGs (MPO) come in through the JPEG plugin.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# We check limits.max_image_pixels ourselves from the header, before any pixel is decoded.
# Pillow's own guard would only warn below twice its limit, and warnings are not a policy.
Image.MAX_IMAGE_PIXELS = None
# Register every plugin now: Image.open(formats=...) looks them up without doing it itself.
Image.init()
# Every image up to this size in one allocation, not Pillow's 16 MB blocks: glibc maps an
# allocation that large straight from the OS and unmaps it when freed, while 16 MB blocks,
# once one is freed, come from the decode threads' malloc arenas, which keep freed memory
# past the decode (per thread, so the budget's bound would not hold). One block is also what
# lets pixels_rgbx view a large image's pixels instead of copying them.
IMAGE_BLOCK_BYTES = 1 << 30
_imaging.set_block_size(IMAGE_BLOCK_BYTES)

_WHITE = (255, 255, 255)
# TIFF codecs accepted: what scanners, cameras and image editors write. libtiff decodes many
# more (old-style JPEG, ThunderScan, SGILog, LZMA, ZSTD, WebP-in-TIFF...), rarely used and
# less exercised: a hostile upload has no business choosing them.
TIFF_COMPRESSIONS = frozenset(
    {
        "raw",
        "tiff_lzw",
        "tiff_deflate",
        "tiff_adobe_deflate",
        "packbits",
        "jpeg",
        "group3",
        "group4",
        "tiff_ccitt",
    }
)
# A TIFF tile up to this many pixels is accepted whatever the image's size (writers use 256
# or 512 square tiles, even on small images); beyond it a tile may not exceed the image.
# libtiff allocates a whole tile per read, so a declared tile is an allocation the header
# alone can make huge.
_TILE_PIXELS_FLOOR = 1024 * 1024
# Rows converted at a time on the high-bit-depth path: its float temporaries stay small
# instead of costing several times the image.
_CHUNK_PIXELS = 1 << 20
# Peak memory of one decode, in bytes per pixel: a decoded pixel is at most 4 bytes here, and
# every conversion below holds the source and one full-size result at once, never more (the
# source is closed as soon as the result exists). limits.max_decode_pixels_in_flight is
# derived from it.
PEAK_BYTES_PER_PIXEL = 8
_NOT_FINITE = "the image's floating-point pixels include NaN or infinity, which have no grey level"
# The JPEG draft keeps the short side at least this multiple of the resize size: with less
# margin the antialiased resize no longer hides the DCT-domain downscale (the tested bound
# on the normalised tensor's error in tests/preprocess fails at 1.1x).
DRAFT_MARGIN = 1.5
# Longest side kept, as a multiple of the short side, before resizing. The centre crop only
# ever sees the middle (about one short side) of the long axis, and resizing a 1x200000
# strip in full would allocate gigabytes: a tiny file as a memory bomb. A 4:1 panorama is
# untouched.
MAX_ASPECT = 4


def decode_image(data: bytes, *, max_image_pixels: int, draft_size: int | None) -> Image.Image:
    """Decode to an upright RGB image, enforcing the pixel limit before any pixel is decoded.

    Raises ``BadImageError`` or ``ImageTooLargeError``.
    """
    return load_rgb(open_image(data, max_image_pixels=max_image_pixels, draft_size=draft_size))


def open_image(data: bytes, *, max_image_pixels: int, draft_size: int | None) -> Image.Image:
    """Read and check the header (format, pixel limit, TIFF codec and tiles); decode nothing.

    Its ``size`` is what ``load_rgb`` will decode (after the JPEG draft). Raises
    ``BadImageError`` or ``ImageTooLargeError``.
    """
    if not data:
        raise BadImageError("the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise BadImageError(
            "the upload is not an image in a supported format (" + ", ".join(ACCEPTED_FORMATS) + ")"
        ) from None
    except Exception as exc:  # malformed headers raise a zoo of types inside Pillow
        raise BadImageError(f"the image header is corrupt ({type(exc).__name__})") from None
    width, height = image.size
    if width * height > max_image_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_image_pixels} (limits.max_image_pixels)"
        )
    if width == 0 or height == 0:
        raise BadImageError(f"the image has no pixels ({width}x{height})")
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        _check_tiff(image)
    if draft_size is not None:
        apply_draft(image, draft_size)
    return image


def apply_draft(image: Image.Image, draft_size: int) -> None:
    """Have a JPEG decode at the smallest DCT scale that keeps ``draft_size``; others as is."""
    if image.format == "JPEG":
        # Decode in the DCT domain at 1/2, 1/4 or 1/8 scale: a 12-megapixel photo then costs
        # its entropy decoding and little else. The short side stays at least
        # DRAFT_MARGIN x the resize size, so the antialiased resize that follows still
        # smooths, and the tensor stays within a tested bound of the full decode.
        image.draft("RGB", (draft_size, draft_size))


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an image from ``open_image`` to upright RGB; raises ``BadImageError``."""
    try:
        # Only the first frame of an animation or a multi-page file is decoded.
        image.load()
    except Exception as exc:
        raise BadImageError(
            f"the image data is corrupt or truncated ({type(exc).__name__})"
        ) from None
    return _to_rgb(_orient(image))


def _check_tiff(image: TiffImagePlugin.TiffImageFile) -> None:
    compression = image.info.get("compression", "raw")
    if compression not in TIFF_COMPRESSIONS:
        raise BadImageError(
            f"TIFF compression {compression!r} is not accepted (accepted: "
            + ", ".join(sorted(TIFF_COMPRESSIONS))
            + ")"
        )
    tile_width = image.tag_v2.get(TiffImagePlugin.TILEWIDTH)
    tile_length = image.tag_v2.get(TiffImagePlugin.TILELENGTH)
    if tile_width is None and tile_length is None:
        return
    if not isinstance(tile_width, int) or not isinstance(tile_length, int):
        raise BadImageError("the TIFF's tile size is invalid")
    width, height = image.size
    # Tiles are multiples of 16 pixels: the image rounded up to them is what one tile can
    # legitimately cover.
    covering = -(-width // 16) * 16 * -(-height // 16) * 16
    if tile_width * tile_length > max(covering, _TILE_PIXELS_FLOOR):
        raise BadImageError(
            f"the TIFF declares {tile_width}x{tile_length} tiles for a {width}x{height} image"
        )


def limit_aspect(image: Image.Image) -> Image.Image:
    """Crop the long axis to ``MAX_ASPECT`` short sides, centred (the crop sees no more)."""
    width, height = image.size
    keep = min(width, height) * MAX_ASPECT
    if width > keep:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    if height > keep:
        top = (height - keep) // 2
        return image.crop((0, top, width, top + keep))
    return image


def _orient(image: Image.Image) -> Image.Image:
    # A broken EXIF block does not make the pixels wrong: classify them as stored. In place:
    # the copy exif_transpose returns otherwise is a full-size copy of every photo.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _rescaled_grey(image)
    if mode in ("La", "RGBa"):
        return _replaced(image, lambda: _premultiplied_over_white(image))
    if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        if mode not in ("RGBA", "LA"):
            # Palette, PA or a colour key (tRNS): Pillow applies the transparency here.
            image = _replaced(image, lambda: image.convert("RGBA"))
        return _replaced(image, lambda: _pasted_over_white(image))
    return _replaced(image, lambda: image.convert("RGB"))


def _replaced(source: Image.Image, make: Callable[[], Image.Image]) -> Image.Image:
    # Conversions run at up to limits.max_image_pixels: the source's memory goes back as
    # soon as its replacement exists, not when the last caller drops it.
    try:
        return make()
    except (ValueError, OSError):  # a mode, or a pair of modes, Pillow cannot convert
        raise BadImageError(f"the image's pixel mode {source.mode} is not supported") from None
    finally:
        source.close()


def _pasted_over_white(image: Image.Image) -> Image.Image:
    # Transparent pixels often hold garbage colour; white is what a viewer shows. Pasting
    # through the alpha band blends in place: the only full-size images are the source and
    # the RGB result (Image.alpha_composite needs a white RGBA and makes an RGBA result: two
    # more).
    background = Image.new("RGB", image.size, _WHITE)
    background.paste(image, mask=image)
    return background


def _premultiplied_over_white(image: Image.Image) -> Image.Image:
    # Associated alpha (TIFF ExtraSamples = 1): the colour is already multiplied by alpha,
    # so over white each band is colour + 255 - alpha. Pillow cannot convert La at all.
    *colour, alpha = image.split()
    clear = ImageChops.invert(alpha)
    bands = [ImageChops.add(band, clear) for band in colour]
    if len(bands) == 1:
        return bands[0].convert("RGB")
    return Image.merge("RGB", bands)


def _rescaled_grey(image: Image.Image) -> Image.Image:
    # High-bit-depth greyscale: Pillow's convert() would clip to 255, not rescale. Converted
    # a band of rows at a time, so the float temporaries stay small whatever the image's size.
    width, height = image.size
    scale = 1 / 257
    if image.mode == "F":
        low, high = cast(tuple[float, float], image.getextrema())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise BadImageError(_NOT_FINITE)
        if high <= 1.0:
            scale = 255.0
    grey = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _CHUNK_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        values = np.array(image.crop((0, top, width, bottom)), dtype=np.float32)
        if not np.isfinite(values).all():
            # Pillow's extrema skip NaN. NaN cast to a byte is an arbitrary grey: the model
            # would classify noise, as confidently as a photo.
            raise BadImageError(_NOT_FINITE)
        values *= scale
        np.clip(values, 0, 255, out=values)
        grey[top:bottom] = values
    image.close()
    return Image.fromarray(grey, mode="L").convert("RGB")
