"""Preprocessor: torchvision's transform (exact, or within one level on the fast path), EXIF
orientation, every mode, limits, bad bytes."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.models import ResNet50_Weights

from batching_server.core.errors import BadImageError, ImageTooLargeError
from batching_server.models import RESNET50, ModelRunner
from batching_server.preprocess import Preprocessor
from tests.fakes import TorchCalls
from tests.images import PHOTOS, data_path, encode, photo, photo_bytes

V1 = ResNet50_Weights.IMAGENET1K_V1.transforms()
V2 = ResNet50_Weights.IMAGENET1K_V2.transforms()


def preprocessor(
    weights: str = "random",
    max_image_pixels: int = 50_000_000,
    jpeg_draft: bool = False,
    fast_resize: bool = False,
) -> Preprocessor:
    """Full decode, torchvision's resize by default: compared bit for bit with torchvision."""
    return Preprocessor(
        transform=RESNET50.transform(weights),
        max_image_pixels=max_image_pixels,
        jpeg_draft=jpeg_draft,
        fast_resize=fast_resize,
    )


def pil(data: bytes) -> Image.Image:
    """What the server should see: the same bytes decoded by Pillow, as RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_model_input(tensor: torch.Tensor) -> None:
    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == torch.float32
    assert bool(torch.isfinite(tensor).all())


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed, so it parses)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    """A 1x1 GIF whose logical screen claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def animated_gif(*colours: tuple[int, int, int]) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("name", PHOTOS)
def test_tensor_equals_torchvision_reference(name: str, fmt: str) -> None:
    data = photo_bytes(name, fmt)
    tensor = preprocessor()(data)
    assert_model_input(tensor)
    assert torch.equal(tensor, V2(pil(data)))


@pytest.mark.parametrize(
    ("weights", "reference", "resize"),
    [
        pytest.param("IMAGENET1K_V1", V1, 256, id="v1"),
        pytest.param("IMAGENET1K_V2", V2, 232, id="v2"),
        pytest.param("random", V2, 232, id="random"),
    ],
)
def test_weights_choose_their_transform(
    weights: str, reference: torch.nn.Module, resize: int
) -> None:
    data = photo_bytes("coffee.png")
    server = preprocessor(weights)
    tensor = server(data)
    assert server.transform.resize_size == [resize]
    assert torch.equal(tensor, reference(pil(data)))
    other = V2 if reference is V1 else V1
    assert not torch.allclose(tensor, other(pil(data)))


def test_exif_orientation_is_applied() -> None:
    image = photo("chelsea.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    data = encode(image, "JPEG", exif=exif)
    with Image.open(io.BytesIO(data)) as stored:
        upright = ImageOps.exif_transpose(stored).convert("RGB")

    decoded = preprocessor().decode(data)
    assert decoded.size == (image.height, image.width)
    assert np.array_equal(pixels(decoded), pixels(upright))
    assert torch.equal(preprocessor()(data), V2(upright))


def test_greyscale_keeps_its_values() -> None:
    data = data_path("camera.png").read_bytes()
    decoded = pixels(preprocessor().decode(data))
    grey = np.asarray(Image.open(data_path("camera.png")), dtype=np.int16)
    assert all(np.array_equal(decoded[..., channel], grey) for channel in range(3))
    assert_model_input(preprocessor()(data))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt: str) -> None:
    palette = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = np.asarray(palette) == 0
    decoded = pixels(preprocessor().decode(encode(palette, fmt, transparency=0)))
    assert transparent.sum() > 1000
    assert (decoded[transparent] == 255).all()
    assert np.array_equal(decoded[~transparent], pixels(palette)[~transparent])


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        pytest.param(photo().convert("P", palette=Image.Palette.ADAPTIVE), "PNG", id="P-png"),
        pytest.param(photo().convert("P"), "GIF", id="P-gif"),
        pytest.param(photo(), "BMP", id="bmp"),
        pytest.param(photo(), "TIFF", id="tiff"),
        pytest.param(photo().convert("L"), "TIFF", id="L-tiff"),
    ],
)
def test_lossless_modes_decode_to_their_rgb_pixels(image: Image.Image, fmt: str) -> None:
    data = encode(image, fmt)
    decoded = preprocessor().decode(data)
    assert decoded.mode == "RGB"
    assert np.array_equal(pixels(decoded), pixels(image))
    assert_model_input(preprocessor()(data))


@pytest.mark.parametrize(
    ("data", "max_mean_error"),
    [
        pytest.param(encode(photo().convert("CMYK"), "JPEG", quality=95), 3, id="cmyk-jpeg"),
        pytest.param(encode(photo(), "WEBP", quality=90), 6, id="webp"),
        pytest.param(encode(photo(), "WEBP", lossless=True), 0, id="webp-lossless"),
    ],
)
def test_lossy_formats_stay_close_to_the_photo(data: bytes, max_mean_error: float) -> None:
    decoded = preprocessor().decode(data)
    assert decoded.mode == "RGB"
    assert np.abs(pixels(decoded) - pixels(photo())).mean() <= max_mean_error
    assert_model_input(preprocessor()(data))


@pytest.mark.parametrize("mode", [pytest.param("RGBA", id="rgba"), pytest.param("LA", id="la")])
def test_fully_transparent_pixels_become_white(mode: str) -> None:
    black_transparent = Image.new(mode, (32, 24), (0,) * len(mode))
    data = encode(black_transparent, "PNG")
    assert (pixels(preprocessor().decode(data)) == 255).all()
    assert_model_input(preprocessor()(data))


def test_half_transparent_pixels_blend_with_white() -> None:
    data = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG")
    assert np.abs(pixels(preprocessor().decode(data)) - 127).max() <= 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(65535, 255, id="white"),
        pytest.param(32768, 128, id="mid-grey"),
        pytest.param(0, 0, id="black"),
    ],
)
def test_16_bit_greyscale_is_rescaled_not_clipped(value: int, expected: int) -> None:
    data = encode(Image.fromarray(np.full((64, 48), value, dtype=np.uint16)), "PNG")
    decoded = pixels(preprocessor().decode(data))
    assert decoded.shape == (64, 48, 3)
    assert np.abs(decoded - expected).max() <= 1
    assert_model_input(preprocessor()(data))


def test_animated_gif_uses_the_first_frame() -> None:
    data = animated_gif((255, 0, 0), (0, 0, 255))
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (pixels(preprocessor().decode(data)) == (255, 0, 0)).all()


def test_real_animated_gif_and_multipage_tiff_use_the_first_frame() -> None:
    for name in ("no_time_for_that_tiny.gif", "multipage.tif"):
        data = data_path(name).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            assert image.n_frames > 1
            first = pixels(image)
            image.seek(1)
            assert not np.array_equal(first, pixels(image))
        assert np.array_equal(pixels(preprocessor().decode(data)), first), name
        assert_model_input(preprocessor()(data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"just some text, not a picture\n" * 4, "supported format", id="text"),
        pytest.param(
            b"<!DOCTYPE html><html><body><img src='cat.jpg'></body></html>",
            "supported format",
            id="html",
        ),
        pytest.param(encode(photo(), "PPM"), "supported format", id="ppm-not-accepted"),
    ],
)
def test_bad_bytes_raise_bad_image(data: bytes, message: str) -> None:
    with pytest.raises(BadImageError, match=message):
        preprocessor()(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_photo_cut_in_half_is_bad_image(fmt: str) -> None:
    data = photo_bytes("astronaut.png", fmt)
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        preprocessor()(data[: len(data) // 2])


def test_pixel_limit_is_inclusive() -> None:
    image = photo("chelsea.png")
    limit = image.width * image.height
    data = encode(image, "PNG")
    assert_model_input(preprocessor(max_image_pixels=limit)(data))
    with pytest.raises(ImageTooLargeError) as raised:
        preprocessor(max_image_pixels=limit - 1)(data)
    assert "max_image_pixels" in raised.value.message
    assert f"451x300 = {limit} pixels" in raised.value.message
    assert str(limit - 1) in raised.value.message
    assert raised.value.status == 413


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(png_declaring(100_000, 100_000), id="png-ihdr"),
        pytest.param(gif_declaring(65_535, 65_535), id="gif-screen"),
    ],
)
def test_decompression_bomb_is_refused_from_its_header(
    data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    with Image.open(io.BytesIO(data)) as declared:
        assert declared.width * declared.height > 4_000_000_000
    assert len(data) < 200
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLargeError, match=r"limits\.max_image_pixels"):
        preprocessor()(data)


# --- the JPEG draft fast path ------------------------------------------------------------------


def camera_jpeg(name: str, size: tuple[int, int]) -> bytes:
    """A real photo at camera resolution, with sensor-like noise, as a quality-92 JPEG."""
    image = photo(name).resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 4, (size[1], size[0], 3))
    noisy = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return encode(Image.fromarray(noisy), "JPEG", quality=92)


@pytest.fixture(scope="module")
def camera_photos() -> dict[str, bytes]:
    return {name: camera_jpeg(name, (4032, 3024)) for name in PHOTOS}


def test_draft_decodes_large_jpegs_at_reduced_scale(camera_photos: dict[str, bytes]) -> None:
    decoded = preprocessor(jpeg_draft=True).decode(camera_photos[PHOTOS[0]])
    assert decoded.size == (504, 378)  # 1/8 scale: the short side stays >= 232
    assert preprocessor(jpeg_draft=False).decode(camera_photos[PHOTOS[0]]).size == (4032, 3024)
    # PNG has no DCT to scale: untouched.
    png = encode(photo(PHOTOS[0]).resize((1200, 900)), "PNG")
    assert preprocessor(jpeg_draft=True).decode(png).size == (1200, 900)


@pytest.mark.slow
def test_draft_stays_close_to_the_reference(
    camera_photos: dict[str, bytes], classifier: ModelRunner
) -> None:
    """Bounded deviation from the full decode, and the same top-1 on the seeded model."""
    fast, exact = preprocessor(jpeg_draft=True), preprocessor(jpeg_draft=False)
    small = {name: photo_bytes(name) for name in PHOTOS}  # too small to draft: exact
    for data in [*camera_photos.values(), *small.values()]:
        drafted, reference = fast(data), exact(data)
        assert torch.equal(reference, V2(pil(data)))
        deviation = (drafted - reference).abs()
        assert deviation.mean() < 0.02
        assert deviation.max() < 0.3
        drafted_top = classifier.forward(drafted[None]).argmax()
        assert drafted_top == classifier.forward(reference[None]).argmax()


# --- the uint8 resize fast path ----------------------------------------------------------------

# One level of one 8-bit channel, normalised: 1 / (255 * smallest std), plus float rounding.
ONE_LEVEL = 1 / (255 * min(V2.std)) + 1e-5


def noise_image(width: int, height: int) -> Image.Image:
    """Random pixels: every rounding difference between two resizers shows."""
    values = np.random.default_rng(width * height).integers(0, 256, (height, width, 3))
    return Image.fromarray(values.astype(np.uint8))


@pytest.mark.parametrize(
    "size",
    [(500, 375), (375, 500), (16, 16), (224, 224), (233, 232), (231, 920), (1001, 4003)],
    ids=str,
)
def test_fast_resize_is_within_one_level_of_torchvision(size: tuple[int, int]) -> None:
    """Odd sizes too: truncated long sides, upsampling, no resize at all, tall and wide."""
    data = encode(noise_image(*size), "PNG")
    tensor = preprocessor(fast_resize=True)(data)
    reference = V2(pil(data))
    assert_model_input(tensor)
    deviation = (tensor - reference).abs()
    assert float(deviation.max()) <= ONE_LEVEL
    assert float(deviation.mean()) < ONE_LEVEL / 4  # most values are identical


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "IMAGENET1K_V2"])
def test_fast_resize_follows_the_weights_transform(weights: str) -> None:
    data = photo_bytes("coffee.png")
    reference = ResNet50_Weights[weights].transforms()(pil(data))
    tensor = preprocessor(weights, fast_resize=True)(data)
    assert float((tensor - reference).abs().max()) <= ONE_LEVEL


def test_fast_resize_is_channels_last() -> None:
    """The model's layout: stacking a batch is then a plain copy, not a transpose."""
    assert preprocessor(fast_resize=True)(photo_bytes()).stride() == (1, 224 * 3, 3)


@pytest.mark.parametrize("size", [(500, 375), (375, 500)], ids=str)
def test_fast_resize_makes_few_torch_calls(size: tuple[int, int]) -> None:
    """Each torch call releases the GIL and takes it back: a chance for the loop to wait.

    The chain it replaced (view, permute, unsqueeze, index, slice, view, mul, add, ...)
    made 14 such calls per image.
    """
    prep = preprocessor(fast_resize=True)
    image = prep.decode(encode(noise_image(*size), "JPEG"))
    with TorchCalls() as calls:
        prep.to_tensor(image)
    # Metadata reads are answered without releasing the GIL.
    releasing = [name for name in calls.names if name not in {"stride", "storage_offset"}]
    assert releasing == ["as_strided", "interpolate", "as_strided", "to", "addcmul", "permute"]


@pytest.mark.slow
def test_fast_resize_keeps_the_top_1(classifier: ModelRunner) -> None:
    fast = preprocessor(fast_resize=True)
    for name in PHOTOS:
        data = photo_bytes(name)
        reference = V2(pil(data))
        got, want = classifier.forward(fast(data)[None]), classifier.forward(reference[None])
        assert got.argmax() == want.argmax()
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def strip_png() -> tuple[Image.Image, bytes]:
    """1x200000 pixels in a few hundred KB: resized in full, 232 x 46 million pixels."""
    strip = noise_image(200_000, 1)
    data = encode(strip, "PNG")
    assert len(data) < 1_000_000
    return strip, data


def test_extreme_aspect_ratios_are_cropped_before_the_fast_resize(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    strip, data = strip_png()
    resized: list[tuple[int, ...]] = []
    interpolate = torch.nn.functional.interpolate

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        result = interpolate(*args, **kwargs)
        resized.append(tuple(result.shape[2:]))  # channels: 4 from Pillow's RGBX memory, or 3
        return result

    monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
    tensor = preprocessor(fast_resize=True)(data)
    assert_model_input(tensor)
    assert resized == [(232, 4 * 232)]
    # What is kept is the middle: the centre 4:1 of the strip, transformed as usual.
    middle = strip.crop((100_000 - 2, 0, 100_000 + 2, 1))
    assert float((tensor - V2(middle)).abs().max()) <= ONE_LEVEL


def test_extreme_aspect_ratios_are_cropped_before_torchvision_resizes() -> None:
    strip, data = strip_png()
    server = preprocessor()
    reference = server.transform
    given: list[tuple[int, int]] = []

    def recording(image: Image.Image) -> torch.Tensor:
        given.append(image.size)
        result: torch.Tensor = reference(image)
        return result

    server.transform = recording  # type: ignore[assignment]
    tensor = server(data)
    assert given == [(4, 1)]
    assert torch.equal(tensor, V2(strip.crop((100_000 - 2, 0, 100_000 + 2, 1))))


def test_four_to_one_panoramas_are_untouched() -> None:
    data = encode(noise_image(1200, 300), "PNG")
    assert torch.equal(preprocessor()(data), V2(pil(data)))
