"""Image bytes to a normalised tensor: limits, decode, EXIF orientation, mode, transforms.

Runs in a thread pool, never on the event loop: Pillow and torch release the GIL here.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision.models import ResNet50_Weights

from .errors import BadImageError, ImageTooLargeError
from .pixels import pixels_rgbx

__all__ = ["ACCEPTED_FORMATS", "Preprocessor", "reference_transform"]

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
# Measured on real photos: a 1.5x margin keeps the mean absolute error of the normalised
# tensor under 0.015 (12 MP at 1/8 scale); at 1.1x it reaches 0.07.
DRAFT_MARGIN = 1.5
# Longest side kept, as a multiple of the short side, before resizing. The centre crop only
# ever sees the middle (about one short side) of the long axis, and resizing a 1x200000
# strip in full would allocate gigabytes: a tiny file as a memory bomb. A 4:1 panorama is
# untouched.
MAX_ASPECT = 4


def reference_transform(weights: str) -> nn.Module:
    """torchvision's own transform for ``weights``; V2's for 'random' and checkpoint files."""
    named = ResNet50_Weights[weights] if weights in ResNet50_Weights.__members__ else None
    transform: nn.Module = (named or ResNet50_Weights.IMAGENET1K_V2).transforms()
    return transform


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


def _limit_aspect(image: Image.Image) -> Image.Image:
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


class _FastTransform:
    """torchvision's ``ImageClassification`` on torch's uint8 antialiased resize kernel.

    torchvision resizes a Pillow image with Pillow, then converts, crops and normalises in
    separate passes; torch's uint8 kernel and one multiply-add are several times faster
    (``python -m benchmarks.preprocess``). Each value stays within one 8-bit level of the
    reference (tested). The result has channels-last strides, as the model wants it.
    """

    def __init__(self, *, resize: int, crop: int, mean: list[float], std: list[float]) -> None:
        self.resize = resize
        self.crop = crop
        # (x / 255 - mean) / std as one multiply-add over the crop's interleaved rows. The
        # constants are a row of pixels, (crop, 3): broadcast along rows, the inner loop runs
        # over whole contiguous rows. (A bare 3-vector on the innermost axis is ten times
        # slower.)
        std_t = torch.tensor(std)
        self.scale_row = std_t.mul(255).reciprocal().repeat(crop, 1)
        self.bias_row = torch.tensor(mean).neg().div(std_t).repeat(crop, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        # Channels-last uint8, the layout the kernel is fastest on. Usually a view of the
        # image's own RGBX memory: the kernel resizes 4 channels as fast as 3 (it widens RGB
        # to 4 bytes itself), with the same values in the first three. ``owner`` keeps the
        # memory alive until the resize has read it.
        pixels, owner = pixels_rgbx(image)
        # torchvision's rule: the short side becomes ``resize``, the long side is truncated.
        short, long = sorted((width, height))
        size = (self.resize, int(self.resize * long / short))
        if height > width:
            size = size[::-1]
        resized = F.interpolate(pixels, size=size, mode="bilinear", antialias=True)
        del owner
        top = round((size[0] - self.crop) / 2.0)
        left = round((size[1] - self.crop) / 2.0)
        # As few torch calls as the maths allows: each one (and each intermediate tensor
        # freed) releases the GIL and takes it back, and every take can keep the event loop
        # waiting for up to a switch interval (5 ms). One strided view is the crop, as
        # (row, column, RGB) whatever the resize's layout; a conversion to float and one
        # fused multiply-add follow. The transform takes the GIL 19 times per image, not 32
        # (perf uprobes on CPython's take_gil).
        _, channel, row, column = resized.stride()
        window = resized.as_strided(
            (self.crop, self.crop, 3),
            (row, column, channel),
            resized.storage_offset() + top * row + left * column,
        )
        rows = window.to(torch.float32, memory_format=torch.contiguous_format)
        torch.addcmul(self.bias_row, rows, self.scale_row, out=rows)
        return rows.permute(2, 0, 1)


def _fast_transform(transform: nn.Module) -> _FastTransform | None:
    """The fast equivalent of ``transform``, or None where there is none."""
    resize: list[int] = getattr(transform, "resize_size", [])
    crop: list[int] = getattr(transform, "crop_size", [])
    mean: list[float] = getattr(transform, "mean", [])
    std: list[float] = getattr(transform, "std", [])
    interpolation = getattr(transform, "interpolation", None)
    if (
        len(mean) != 3
        or len(std) != 3
        or len(resize) != 1
        or len(crop) != 1
        or resize[0] < crop[0]  # torchvision would pad; keep its exact behaviour
        or interpolation is None
        or interpolation.value != "bilinear"
        or not getattr(transform, "antialias", False)
    ):
        return None
    return _FastTransform(resize=resize[0], crop=crop[0], mean=mean, std=std)


class Preprocessor:
    """Turns uploaded bytes into the (3, 224, 224) tensor the chosen weights expect."""

    def __init__(
        self,
        *,
        weights: str,
        max_image_pixels: int,
        jpeg_draft: bool = True,
        fast_resize: bool = True,
    ) -> None:
        self.transform = reference_transform(weights)
        self.max_image_pixels = max_image_pixels
        resize_size: list[int] = getattr(self.transform, "resize_size", [])
        self.draft_size = (
            round(resize_size[0] * DRAFT_MARGIN) if jpeg_draft and resize_size else None
        )
        self._fast = _fast_transform(self.transform) if fast_resize else None

    def decode(self, data: bytes) -> Image.Image:
        """Decode to an upright RGB image, enforcing the pixel limit before decoding."""
        return _to_rgb(_orient(_open(data, self.max_image_pixels, self.draft_size)))

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """The model input for a decoded RGB image."""
        image = _limit_aspect(image)
        # An inference tensor, as the model's batches are: a lone image then goes to the
        # model as it is, with no copy (a normal tensor would be copied into one).
        with torch.inference_mode():
            if self._fast is not None:
                return self._fast(image)
            tensor: torch.Tensor = self.transform(image)
            return tensor

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode and transform; raises ``BadImageError`` or ``ImageTooLargeError``."""
        return self.to_tensor(self.decode(data))
