"""pixels_rgbx: a zero-copy view of Pillow's memory where it can be, an exact copy elsewhere."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from batching_server.models import RESNET50
from batching_server.preprocess import Preprocessor
from batching_server.preprocess.decode import IMAGE_BLOCK_BYTES, decode_image
from batching_server.preprocess.pixels import pixels_rgbx
from tests.images import encode, photo_bytes


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    values = np.random.default_rng(width * 7 + height).integers(0, 256, (height, width, 3))
    return Image.fromarray(values.astype(np.uint8)).convert(mode)


def as_hwc(pixels: torch.Tensor) -> np.ndarray[Any, Any]:
    return pixels[0, :3].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (501, 377), (2000, 2000)])
def test_view_of_pillows_memory(size: tuple[int, int]) -> None:
    image = noise(*size)
    pixels, _owner = pixels_rgbx(image)
    assert pixels.shape == (1, 4, size[1], size[0])
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(as_hwc(pixels), np.array(image))
    # A view, not a copy: a pixel written through Pillow shows in the tensor.
    image.putpixel((0, 0), (1, 2, 3))
    assert pixels[0, :3, 0, 0].tolist() == [1, 2, 3]


def test_view_outlives_the_image_while_its_owner_lives() -> None:
    image = noise(301, 203)
    expected = np.array(image)
    pixels, owner = pixels_rgbx(image)
    del image
    gc.collect()
    # Freed memory would be handed to these at once, and overwritten.
    others = [Image.new("RGB", (301, 203), (7, 7, 7)) for _ in range(8)]
    np.testing.assert_array_equal(as_hwc(pixels), expected)
    del owner, others


def test_images_over_one_memory_block_are_copied() -> None:
    block = Image.core.get_block_size()
    Image.core.set_block_size(16 * 2**20)  # Pillow's default, which decode.py raises
    try:
        image = noise(2100, 2000)  # 16.8 MB as RGBX: past one block, no export
    finally:
        Image.core.set_block_size(block)
    pixels, _owner = pixels_rgbx(image)
    assert pixels.shape == (1, 3, 2000, 2100)
    np.testing.assert_array_equal(as_hwc(pixels), np.array(image))


def test_decoded_images_up_to_a_gigabyte_are_one_block_and_viewed() -> None:
    """The server raises Pillow's block size: a large photo is viewed, not copied (3 B/px)."""
    data = encode(Image.new("RGB", (4000, 3000), (10, 20, 30)), "PNG")
    image = decode_image(data, max_image_pixels=10**8, draft_size=None)
    assert IMAGE_BLOCK_BYTES >= 4000 * 3000 * 4
    pixels, _owner = pixels_rgbx(image)
    assert pixels.shape == (1, 4, 3000, 4000)
    image.putpixel((3999, 2999), (1, 2, 3))
    assert pixels[0, :3, 2999, 3999].tolist() == [1, 2, 3]


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK"])
def test_other_modes_are_converted_to_rgb(mode: str) -> None:
    image = noise(33, 17, mode)
    pixels, _owner = pixels_rgbx(image)
    assert pixels.shape == (1, 3, 17, 33)
    np.testing.assert_array_equal(as_hwc(pixels), np.array(image.convert("RGB")))


def test_without_arrow_export_the_copy_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    image = noise(64, 48)

    def no_export(self: Image.Image, requested_schema: object = None) -> Any:
        raise AttributeError("__arrow_c_array__")

    monkeypatch.setattr(Image.Image, "__arrow_c_array__", no_export)
    pixels, _owner = pixels_rgbx(image)
    assert pixels.shape == (1, 3, 48, 64)
    np.testing.assert_array_equal(as_hwc(pixels), np.array(image))


def test_fast_preprocessing_reads_pixels_without_tobytes(monkeypatch: pytest.MonkeyPatch) -> None:
    preprocessor = Preprocessor(
        transform=RESNET50.transform("random"), max_image_pixels=50_000_000, fast_resize=True
    )
    data = photo_bytes()
    viewed = preprocessor(data)
    calls: list[str] = []
    tobytes = Image.Image.tobytes

    def spy(self: Image.Image, *args: Any, **kwargs: Any) -> bytes:
        calls.append(self.mode)
        return tobytes(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "tobytes", spy)
    assert preprocessor(data).equal(viewed)
    assert calls == []
    # The copy (no Arrow export) gives the same tensor, bit for bit, through tobytes.
    monkeypatch.delattr(Image.Image, "__arrow_c_array__")
    assert preprocessor(data).equal(viewed)
    assert calls == ["RGB"]
