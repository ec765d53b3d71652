"""The JPEG decoder adapter: torchvision's operators, without its per-call deprecation warning."""

from __future__ import annotations

import pytest
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from batching_server.models.jpeg_decoder import TorchvisionJpegDecoder, decoder_available
from tests.images import encode, photo, photo_bytes

CPU = torch.device("cpu")


def test_the_operators_are_there() -> None:
    assert decoder_available()


def test_same_pixels_as_torchvisions_public_function_which_warns() -> None:
    """The day torchvision drops or changes these, this fails: move the adapter to TorchCodec."""
    files = [photo_bytes(), encode(photo().convert("L"))]
    with pytest.warns(DeprecationWarning, match="TorchCodec"):
        public = decode_jpeg(
            [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files],
            mode=ImageReadMode.RGB,
        )
    ours = TorchvisionJpegDecoder()(files, CPU)  # warnings are errors here: none is raised
    assert len(ours) == 2
    for mine, theirs in zip(ours, public, strict=True):
        assert torch.equal(mine, theirs)
    assert ours[1].shape == (3, 300, 451)  # greyscale comes back as RGB
    assert ours[0].dtype == torch.uint8


def test_a_broken_file_fails_the_whole_call() -> None:
    good = photo_bytes()
    sos = good.index(b"\xff\xda")
    broken = good[: sos + 200] + b"\xff\x00\xff\xc0\x00" * 50 + good[sos + 450 :]
    with pytest.raises(RuntimeError):
        TorchvisionJpegDecoder()([good, broken], CPU)
