"""Hostile or odd uploads: every pixel mode converts or is a 400, never a 500; TIFF codecs and
tiles are checked from the header; non-finite float pixels are refused."""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, TiffImagePlugin

from batching_server.core.errors import BadImageError
from batching_server.models import RESNET50
from batching_server.preprocess import Preprocessor
from batching_server.preprocess.decode import TIFF_COMPRESSIONS
from tests.images import encode, photo, tiff

WIDTH, HEIGHT = 7, 5


def preprocessor() -> Preprocessor:
    return Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**7)


def decodes_or_refuses(data: bytes) -> str:
    """'RGB' when the upload decodes to a tensor, else the 400's message."""
    prep = preprocessor()
    try:
        decoded = prep.decode(data)
        tensor = prep(data)
    except BadImageError as exc:
        return exc.message
    assert tensor.shape == (3, 224, 224)
    return decoded.mode


def tiff_for(key: tuple[Any, ...], data: bytes | None = None, **tags: list[int]) -> bytes:
    """An uncompressed TIFF with the tags that select ``key`` in Pillow's OPEN_INFO."""
    order, photometric, sample_format, fill_order, bits, extra = key
    if data is None:
        row = math.ceil(WIDTH * sum(bits) / 8)
        data = np.random.default_rng(len(bits) * 31 + sum(bits)).bytes(row * HEIGHT)
    fields = {
        258: list(bits),  # BitsPerSample
        262: [photometric],
        266: [fill_order],
        277: [len(bits)],  # SamplesPerPixel
        339: [sample_format[0]] * len(bits),  # SampleFormat
    }
    if extra:
        fields[338] = list(extra)  # ExtraSamples
    if photometric == 3:
        fields[320] = [(i * 4099) % 65536 for i in range(3 * 2 ** bits[0])]  # ColorMap
    fields.update({int(tag.removeprefix("tag")): value for tag, value in tags.items()})
    return tiff(WIDTH, HEIGHT, fields, data, big_endian=order == b"MM")


def saved(mode: str, fmt: str, **options: Any) -> bytes:
    image = photo().resize((40, 30)).convert(mode)
    return encode(image, fmt, **options)


# Pillow's own writers, for the other formats and the transparency keys: each one converts.
WRITTEN = {
    **{f"png-{m}": saved(m, "PNG") for m in ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")},
    "png-L-trns": saved("L", "PNG", transparency=7),
    "png-RGB-trns": saved("RGB", "PNG", transparency=(1, 2, 3)),
    "png-1-trns": saved("1", "PNG", transparency=0),
    **{f"gif-{m}": saved(m, "GIF") for m in ("L", "P")},
    "gif-L-trns": saved("L", "GIF", transparency=3),
    **{f"bmp-{m}": saved(m, "BMP") for m in ("1", "L", "P", "RGB", "RGBA")},
    **{f"webp-{m}": saved(m, "WEBP") for m in ("RGB", "RGBA")},
    **{f"jpeg-{m}": saved(m, "JPEG") for m in ("L", "RGB", "CMYK")},
    **{f"tiff-{m}": saved(m, "TIFF") for m in ("CMYK", "LAB", "YCbCr", "PA")},
    **{f"tiff-{m}": saved(m, "TIFF") for m in ("I;16", "I;16B", "I", "F")},
}
# Every pixel layout Pillow's TIFF reader knows, with random pixels (NaN floats, premultiplied
# alpha, 2-bit palettes...): a client can send any of them.
LAYOUTS = {"tiff-" + "-".join(map(str, key)): tiff_for(key) for key in TiffImagePlugin.OPEN_INFO}
REFUSALS = (
    "the image data is corrupt or truncated (ValueError)",  # bit orders Pillow cannot unpack
    "the image's floating-point pixels include NaN or infinity, which have no grey level",
)


@pytest.mark.parametrize(
    ("data", "outcomes"),
    [
        *(pytest.param(data, ("RGB",), id=name) for name, data in WRITTEN.items()),
        *(pytest.param(data, ("RGB", *REFUSALS), id=name) for name, data in LAYOUTS.items()),
    ],
)
def test_every_mode_converts_to_rgb_or_is_bad_image(data: bytes, outcomes: tuple[str, ...]) -> None:
    """What Pillow opens from the accepted formats is a tensor or a 400, never a 500."""
    assert decodes_or_refuses(data) in outcomes


def la_tiff(pairs: list[tuple[int, int]]) -> bytes:
    """A 1-pixel-high grey TIFF with associated (premultiplied) alpha: Pillow's mode La."""
    data = bytes(value for pair in pairs for value in pair)
    key = (b"II", 1, (1,), 1, (8, 8), (1,))
    encoded = tiff_for(key, data, tag256=[len(pairs)], tag257=[1])
    with Image.open(io.BytesIO(encoded)) as image:
        assert image.mode == "La"
    return encoded


def test_premultiplied_grey_and_alpha_is_composited_over_white() -> None:
    """Pillow cannot convert La at all; over white, each level is grey + 255 - alpha."""
    pairs = [(0, 0), (0, 255), (255, 255), (100, 200), (60, 128), (255, 0)]
    decoded = np.asarray(preprocessor().decode(la_tiff(pairs)))
    assert decoded.shape == (1, len(pairs), 3)
    expected = [min(255, grey + 255 - alpha) for grey, alpha in pairs]
    assert decoded[0, :, 0].tolist() == expected == [255, 0, 255, 155, 187, 255]
    assert (decoded == decoded[..., :1]).all()  # grey stays grey


def float_tiff(values: list[float]) -> bytes:
    data = struct.pack(f"<{len(values)}f", *values)
    return tiff_for((b"II", 1, (3,), 1, (32,), ()), data, tag256=[len(values)], tag257=[1])


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), -float("inf")],
    ids=["nan", "inf", "-inf"],
)
@pytest.mark.parametrize("where", [0, 3], ids=["first", "last"])
def test_non_finite_float_pixels_are_bad_image(bad: float, where: int) -> None:
    """NaN has no grey level: classifying it would answer 200 with a class for noise."""
    values = [0.0, 0.5, 1.0, 0.25]
    decoded = np.asarray(preprocessor().decode(float_tiff(values)))
    assert decoded[0, :, 0].tolist() == [0, 127, 255, 63]  # floats in [0, 1] are levels / 255
    values[where] = bad
    with pytest.raises(BadImageError, match="NaN or infinity") as raised:
        preprocessor()(float_tiff(values))
    assert raised.value.status == 400


# --- TIFF codecs and tiles, checked from the header ------------------------------------------


def refuse_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails any pixel decode (Pillow's own, or libtiff's): a refusal must come first."""
    loads: list[str] = []

    def refuse(self: Image.Image) -> None:
        loads.append(type(self).__name__)
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", refuse)
    return loads


ACCEPTED_CODECS = {1, 2, 3, 4, 5, 7, 8, 32773, 32946}


@pytest.mark.parametrize(
    ("data", "accepted"),
    [
        *(
            pytest.param(encode(photo().convert(mode), "TIFF", compression=name), True, id=name)
            for mode, name in [
                ("RGB", "tiff_lzw"),
                ("RGB", "tiff_adobe_deflate"),
                ("RGB", "packbits"),
                ("RGB", "jpeg"),
                ("1", "group3"),
                ("1", "group4"),
            ]
        ),
        *(
            pytest.param(
                tiff_for((b"II", 2, (1,), 1, (8, 8, 8), ()), tag259=[code]),
                False,
                id=TiffImagePlugin.COMPRESSION_INFO[code],
            )
            for code in sorted(set(TiffImagePlugin.COMPRESSION_INFO) - ACCEPTED_CODECS)
        ),
    ],
)
def test_only_common_tiff_codecs_are_decoded(data: bytes, accepted: bool) -> None:
    """Old-style JPEG, ThunderScan, SGILog, LZMA, ZSTD...: refused from the header."""
    with Image.open(io.BytesIO(data)) as image:
        name = image.info["compression"]
        assert (name in TIFF_COMPRESSIONS) == accepted
        expected = np.asarray(image.convert("RGB")) if accepted and name != "jpeg" else None
    if accepted:
        decoded = preprocessor().decode(data)
        assert expected is None or np.array_equal(np.asarray(decoded), expected)
        return
    with pytest.MonkeyPatch.context() as patch:
        loads = refuse_decoding(patch)
        with pytest.raises(BadImageError, match=f"TIFF compression '{name}' is not accepted"):
            preprocessor()(data)
    assert loads == []


@pytest.mark.parametrize(
    ("size", "tile", "compression"),
    [
        pytest.param((16, 16), (65520, 65520), 1, id="bomb-raw"),
        pytest.param((16, 16), (65520, 65520), 8, id="bomb-deflate"),
        pytest.param((16, 4000), (4096, 4096), 8, id="bomb-tall"),
        pytest.param((WIDTH, HEIGHT), (256, 256), 1, id="small-image-usual-tile"),
        pytest.param((600, 100), (608, 112), 1, id="one-tile-covers-the-image"),
    ],
)
def test_tiff_tiles_far_beyond_the_image_are_refused_before_decoding(
    size: tuple[int, int], tile: tuple[int, int], compression: int
) -> None:
    """A tiny file declaring huge tiles: libtiff would allocate a whole tile per read.

    A writer's usual 256x256 tile on a small image, or one tile covering the image, is fine.
    """
    (width, height), (tile_width, tile_length) = size, tile
    bomb = tile_width * tile_length > 1024 * 1024
    # A bomb's file holds 768 bytes; an ordinary tile holds its pixels.
    shape = (16, 16, 3) if bomb else (tile_length, tile_width, 3)
    pixels = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    data = tiff_for(
        (b"II", 2, (1,), 1, (8, 8, 8), ()),
        pixels.tobytes(),
        tag256=[width],
        tag257=[height],
        tag259=[compression],
        tag322=[tile_width],
        tag323=[tile_length],
    )
    if not bomb:
        decoded = preprocessor().decode(data)
        assert np.array_equal(np.asarray(decoded), pixels[:height, :width])
        return
    assert len(data) < 1000
    with pytest.MonkeyPatch.context() as patch:
        loads = refuse_decoding(patch)
        match = f"{tile_width}x{tile_length} tiles for a {width}x{height} image"
        with pytest.raises(BadImageError, match=match):
            preprocessor()(data)
    assert loads == []
