"""torchvision's classification transform, and a faster twin of it for the common case.

torchvision resizes a Pillow image with Pillow, then converts, crops and normalises in
separate passes; torch's uint8 antialiased kernel and one multiply-add do the same work in
fewer, cheaper steps (``python -m benchmarks.preprocess`` compares them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .pixels import pixels_rgbx

__all__ = ["FastTransform", "ResizeCropNormalize", "fast_transform", "resize_crop_normalize"]


@dataclass(frozen=True, slots=True)
class ResizeCropNormalize:
    """torchvision's classification transform in numbers: what the fast paths reproduce."""

    resize: int  # the short side after the (bilinear, antialiased) resize
    crop: int  # the side of the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class FastTransform:
    """torchvision's ``ImageClassification`` on torch's uint8 antialiased resize kernel.

    Each value stays within one 8-bit level of the reference (tested). The result has
    channels-last strides, as the model wants it.
    """

    def __init__(self, *, resize: int, crop: int, mean: list[float], std: list[float]) -> None:
        self.resize = resize
        self.crop = crop
        # (x / 255 - mean) / std as one multiply-add over the crop's interleaved rows. The
        # constants are a row of pixels, (crop, 3): broadcast along rows, the inner loop runs
        # over whole contiguous rows (a bare 3-vector on the innermost axis defeats
        # vectorisation).
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
        # waiting for up to a switch interval. One strided view is the crop, as
        # (row, column, RGB) whatever the resize's layout; a conversion to float and one
        # fused multiply-add follow.
        _, channel, row, column = resized.stride()
        window = resized.as_strided(
            (self.crop, self.crop, 3),
            (row, column, channel),
            resized.storage_offset() + top * row + left * column,
        )
        rows = window.to(torch.float32, memory_format=torch.contiguous_format)
        torch.addcmul(self.bias_row, rows, self.scale_row, out=rows)
        return rows.permute(2, 0, 1)


def resize_crop_normalize(transform: nn.Module) -> ResizeCropNormalize | None:
    """``transform``'s numbers when it is the usual bilinear, antialiased resize-crop-normalise
    (torchvision's ``ImageClassification``), or None where it is anything else."""
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
    return ResizeCropNormalize(
        resize=resize[0],
        crop=crop[0],
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
    )


def fast_transform(transform: nn.Module) -> FastTransform | None:
    """The fast equivalent of ``transform``, or None where there is none."""
    numbers = resize_crop_normalize(transform)
    if numbers is None:
        return None
    return FastTransform(
        resize=numbers.resize, crop=numbers.crop, mean=list(numbers.mean), std=list(numbers.std)
    )
