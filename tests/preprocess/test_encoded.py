"""JPEGs kept encoded for the model's device: which ones, what the HTTP side still checks."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from batching_server.core.errors import BadImageError, ImageTooLargeError
from batching_server.models import RESNET50
from batching_server.preprocess import EncodedJpeg, Preprocessor, encoded_jpeg
from tests.images import encode, photo, photo_bytes

JPEG = photo_bytes()


def preprocessor(*, keep: bool = True, max_image_pixels: int = 50_000_000) -> Preprocessor:
    return Preprocessor(
        transform=RESNET50.transform("random"),
        max_image_pixels=max_image_pixels,
        keep_jpegs_encoded=keep,
    )


def oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(), "JPEG", exif=exif)


def test_a_baseline_jpeg_is_checked_and_kept_encoded() -> None:
    kept = preprocessor().prepare(JPEG)
    assert kept == EncodedJpeg(JPEG, 451, 300, 1)
    assert kept.pixels == 451 * 300


def test_greyscale_jpegs_are_kept_too() -> None:
    grey = encode(photo().convert("L"))
    assert isinstance(preprocessor().prepare(grey), EncodedJpeg)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_exif_orientation_is_read_from_the_header(orientation: int) -> None:
    kept = preprocessor().prepare(oriented(orientation))
    assert isinstance(kept, EncodedJpeg)
    assert kept.orientation == orientation
    assert (kept.width, kept.height) == (451, 300)  # as stored: turned on the device


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(photo(), "JPEG", progressive=True), id="progressive"),
        pytest.param(encode(photo().convert("CMYK")), id="cmyk"),
        pytest.param(photo_bytes(fmt="PNG"), id="png"),
        pytest.param(photo_bytes(fmt="WEBP"), id="webp"),
        pytest.param(JPEG + b"trailer", id="bytes-after-end-of-image"),
    ],
)
def test_other_files_take_the_cpu_path(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        assert encoded_jpeg(image, data) is None
    result = preprocessor().prepare(data)
    assert isinstance(result, torch.Tensor)
    assert result.shape == (3, 224, 224)


@pytest.mark.parametrize("cut", [2, len(JPEG) // 2], ids=["end-of-image", "half"])
def test_a_truncated_jpeg_takes_the_cpu_path_and_is_refused(cut: int) -> None:
    # libjpeg-turbo (the device twin) would only warn and return grey rows: the file must
    # not reach it, so that the answer stays the CPU path's 400.
    data = JPEG[:-cut]
    with Image.open(io.BytesIO(data)) as image:
        assert encoded_jpeg(image, data) is None
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        preprocessor().prepare(data)


def test_an_out_of_range_orientation_counts_as_upright() -> None:
    kept = preprocessor().prepare(oriented(9))
    assert isinstance(kept, EncodedJpeg)
    assert kept.orientation == 1


def test_the_pixel_limit_and_a_corrupt_header_are_still_checked() -> None:
    with pytest.raises(ImageTooLargeError, match="over the limit of 1000"):
        preprocessor(max_image_pixels=1000).prepare(JPEG)
    with pytest.raises(BadImageError, match=r"header is corrupt|not an image"):
        preprocessor().prepare(JPEG[:200])


def test_without_keep_every_image_is_a_tensor() -> None:
    assert isinstance(preprocessor(keep=False).prepare(JPEG), torch.Tensor)
