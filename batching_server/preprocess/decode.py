"""Image bytes to an upright RGB Pillow image: format sniffing, pixel limit, decode, EXIF.

Runs in the decode threads, never on the event loop: Pillow releases the GIL while it decodes.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import BadImageError, ImageTooLargeError

__all__ = ["ACCEPTED_FORMATS", "DRAFT_MARGIN", "MAX_ASPECT", "decode_image", "limit_aspect"]

# Formats a camera, phone or browser produces. Leaving out the rest (EPS, for one, shells
# out to Ghostscript) keeps Pillow's least-audited decoders away from untrusted bytes.
# Phones' multi-picture JPEGs (MPO) come in through the JPEG plugin.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# We check limits.max_image_pixels ourselves from the header, before any pixel is decoded.
# Pillow's own guard would only warn below twice its limit, and warnings are not a policy.
Image.MAX_IMAGE_PIXELS = None
# Register every plugin now: Image.open(formats=...) looks them up without doing it itself.
Image.init()

_WHITE = (255, 255, 255, 255)
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
    return _to_rgb(_orient(_open(data, max_image_pixels, draft_size)))


def _open(data: bytes, max_image_pixels: int, draft_size: int | None) -> Image.Image:
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
    if draft_size is not None and image.format == "JPEG":
        # Decode in the DCT domain at 1/2, 1/4 or 1/8 scale: a 12-megapixel photo then costs
        # its entropy decoding and little else. The short side stays at least
        # DRAFT_MARGIN x the resize size, so the antialiased resize that follows still
        # smooths, and the tensor stays within a tested bound of the full decode.
        image.draft("RGB", (draft_size, draft_size))
    try:
        # Only the first frame of an animation or a multi-page file is decoded.
        image.load()
    except Exception as exc:
        raise BadImageError(
            f"the image data is corrupt or truncated ({type(exc).__name__})"
        ) from None
    return image


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
        # High-bit-depth greyscale: Pillow's convert() would clip to 255, not rescale.
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if mode == "F" and values.max(initial=0.0) <= 1.0 else 1 / 257
        grey = np.clip(values * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        # Transparent pixels often hold garbage colour; white is what a viewer shows.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
