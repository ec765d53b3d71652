"""``DevicePreprocessor``: a batch's encoded JPEGs to normalised tensors on the model's device.

The HTTP side has checked each JPEG's header (``preprocess/encoded.py``); here, in the model
thread, the batch's JPEGs are decoded together (one batched nvJPEG call on CUDA), turned
upright, resized, cropped and normalised as the weights' own transform does, on the device the
forward pass runs on. On the CPU the same code runs with libjpeg-turbo: the twin CI tests.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence

import structlog
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..core.errors import ServiceError
from ..preprocess.decode import MAX_ASPECT
from ..preprocess.encoded import EncodedJpeg
from ..preprocess.transforms import ResizeCropNormalize, resize_crop_normalize
from .jpeg_decoder import JpegDecoder, TorchvisionJpegDecoder, decoder_available

__all__ = [
    "DEVICE_BYTES_PER_PIXEL",
    "DevicePreprocessor",
    "cuda_free_bytes",
    "device_preprocess_enabled",
    "limit_aspect",
    "memory_pixel_budget",
    "pixel_chunks",
]

log = structlog.get_logger(__name__)

# Device memory one decoded pixel may cost at the peak of a chunk: 3 bytes of decoded RGB,
# up to 3 of the decoder's own planes, and, for the image being resized, a float32 copy (12)
# and its orientation (3), rounded up. Counting every pixel of a chunk at this rate also
# covers a chunk of one image that fills the whole budget.
DEVICE_BYTES_PER_PIXEL = 22
# Of the device memory free when a batch starts, the share its decodes may take: the forward
# pass that follows, and any other model thread's, need the rest.
_FREE_MEMORY_SHARE = 0.5

# Orientation 2-8 (EXIF) as tensor operations on (C, H, W): what Pillow's exif_transpose does
# on the CPU path (tested against it).
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


def device_preprocess_enabled(setting: str, device: torch.device, transform: nn.Module) -> bool:
    """Whether JPEGs stay encoded for the model's ``device`` (``preprocess.device``).

    ``auto`` is ``model`` on CUDA. Only a resize-crop-normalise transform can be reproduced
    on the device, and only with torchvision's JPEG operators loaded; otherwise the CPU path
    serves every image.
    """
    if setting == "cpu" or (setting == "auto" and device.type != "cuda"):
        return False
    return resize_crop_normalize(transform) is not None and decoder_available()


def pixel_chunks(pixels: Sequence[int], budget: int) -> list[range]:
    """Consecutive runs of items whose pixels add up to at most ``budget`` each.

    An item over the whole budget gets a run of its own: it is never refused here
    (``limits.max_image_pixels`` does that), and decodes alone.
    """
    chunks: list[range] = []
    start, held = 0, 0
    for index, count in enumerate(pixels):
        if index > start and held + count > budget:
            chunks.append(range(start, index))
            start, held = index, 0
        held += count
    if start < len(pixels):
        chunks.append(range(start, len(pixels)))
    return chunks


def memory_pixel_budget(free_bytes: Callable[[], int]) -> Callable[[], int]:
    """A pixel budget read from the device's free memory each time it is asked."""

    def budget() -> int:
        return max(1, int(free_bytes() * _FREE_MEMORY_SHARE) // DEVICE_BYTES_PER_PIXEL)

    return budget


def cuda_free_bytes(device: torch.device) -> Callable[[], int]:
    """Free memory on a CUDA device, counting what torch's allocator holds unused."""

    def free() -> int:
        driver_free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(driver_free + cached)

    return free


class DevicePreprocessor:
    """Decodes and transforms a batch's ``EncodedJpeg``s on ``device``; blocking.

    Each call's decodes are split into chunks of at most ``pixel_budget()`` pixels. A chunk
    whose batched decode fails is retried image by image; an image that still fails goes
    through ``fallback`` (the CPU path: bytes to a tensor, or a ``ServiceError``), so one
    bad file costs only its own request.
    """

    def __init__(
        self,
        *,
        numbers: ResizeCropNormalize,
        device: torch.device,
        fallback: Callable[[bytes], torch.Tensor],
        pixel_budget: Callable[[], int],
        decoder: JpegDecoder | None = None,
    ) -> None:
        self.numbers = numbers
        self.device = device
        self.fallback = fallback
        self.pixel_budget = pixel_budget
        self.decoder: JpegDecoder = decoder or TorchvisionJpegDecoder()
        std = torch.tensor(numbers.std, device=device)
        # (x / 255 - mean) / std as one multiply-add.
        self._scale = std.mul(255).reciprocal().view(3, 1, 1)
        self._bias = torch.tensor(numbers.mean, device=device).neg().div(std).view(3, 1, 1)

    def __call__(self, items: Sequence[EncodedJpeg]) -> list[torch.Tensor | ServiceError]:
        """Each item's (3, crop, crop) float32 normalised tensor on the device, or its error."""
        results: list[torch.Tensor | ServiceError] = []
        with torch.inference_mode():
            for chunk in pixel_chunks([item.pixels for item in items], self.pixel_budget()):
                part = [items[i] for i in chunk]
                for item, decoded in zip(part, self._decode(part), strict=True):
                    if isinstance(decoded, torch.Tensor):
                        results.append(self.transform(decoded, item.orientation))
                    else:
                        results.append(self._fall_back(item, decoded))
        return results

    def transform(self, pixels: torch.Tensor, orientation: int = 1) -> torch.Tensor:
        """A decoded (3, H, W) uint8 image, turned upright, resized, cropped and normalised."""
        upright = _ORIENT[orientation](pixels) if orientation in _ORIENT else pixels
        cropped = limit_aspect(upright)
        height, width = cropped.shape[-2:]
        numbers = self.numbers
        # torchvision's rule: the short side becomes ``resize``, the long side is truncated.
        short, long = sorted((width, height))
        size = (numbers.resize, int(numbers.resize * long / short))
        if height > width:
            size = size[::-1]
        resized = F.interpolate(
            cropped.unsqueeze(0).to(torch.float32), size=size, mode="bilinear", antialias=True
        )[0]
        top = round((size[0] - numbers.crop) / 2.0)
        left = round((size[1] - numbers.crop) / 2.0)
        window = resized[:, top : top + numbers.crop, left : left + numbers.crop]
        # Rounded to 8-bit levels, as the CPU path's uint8 resize and torchvision's Pillow
        # resize both are: the tensor then stays within their tested bounds.
        levels = window.round().clamp_(0, 255)
        return torch.addcmul(self._bias, levels, self._scale)

    def _decode(self, items: list[EncodedJpeg]) -> list[torch.Tensor | Exception]:
        """Each item's decoded (3, H, W) uint8 pixels, or why the decoder refused it."""
        try:
            return list(self.decoder([item.data for item in items], self.device))
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        # One bad file fails a whole batched call: find it, and decode the others.
        return [decoded for item in items for decoded in self._decode([item])]

    def _fall_back(self, item: EncodedJpeg, exc: Exception) -> torch.Tensor | ServiceError:
        started = time.perf_counter()
        try:
            tensor = self.fallback(item.data).to(self.device)
        except ServiceError as error:
            result: torch.Tensor | ServiceError = error
        else:
            result = tensor
        log.warning(
            "device_decode_failed",
            error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            bytes=len(item.data),
            fallback="cpu" if isinstance(result, torch.Tensor) else "refused",
            fallback_seconds=round(time.perf_counter() - started, 6),
        )
        return result

    def warm_up(self) -> None:
        """Decode and transform one small JPEG: the decoder's first call sets it up (slow).

        Straight through the decoder, with no fallback: a device that cannot decode at all
        fails warm-up, loudly, rather than sending every JPEG to the CPU in the model thread.
        """
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 64, 32)).save(buffer, format="JPEG")
        with torch.inference_mode():
            (decoded,) = self.decoder([buffer.getvalue()], self.device)
            self.transform(decoded)


def limit_aspect(pixels: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) view with the long axis cut to ``MAX_ASPECT`` short sides, centred.

    As ``decode.limit_aspect`` on the CPU path: the centre crop sees no more, and a
    1x200000 strip would otherwise be resized in full (gigabytes, from a tiny file).
    """
    height, width = pixels.shape[-2:]
    keep = min(width, height) * MAX_ASPECT
    if width > keep:
        left = (width - keep) // 2
        return pixels[..., left : left + keep]
    if height > keep:
        top = (height - keep) // 2
        return pixels[..., top : top + keep, :]
    return pixels
