"""Preprocessing on the model's device, tested on its CPU twin (libjpeg-turbo through the same
code); the CUDA test runs only where a GPU is."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import structlog.testing
import torch
from PIL import Image
from torchvision.models import ResNet50_Weights

from batching_server.core.errors import BadImageError, ServiceError
from batching_server.models import RESNET50, ModelRunner
from batching_server.models.device_preprocess import (
    DEVICE_BYTES_PER_PIXEL,
    DevicePreprocessor,
    limit_aspect,
    memory_pixel_budget,
    pixel_chunks,
)
from batching_server.models.jpeg_decoder import TorchvisionJpegDecoder
from batching_server.preprocess import EncodedJpeg, Preprocessor
from batching_server.preprocess import decode as cpu_decode
from batching_server.preprocess.transforms import resize_crop_normalize
from tests.images import PHOTOS, encode, photo, photo_bytes

CPU = torch.device("cpu")
TRANSFORM = RESNET50.transform("random")
NUMBERS = resize_crop_normalize(TRANSFORM)
# One level of one 8-bit channel, normalised: 1 / (255 * smallest std), plus float rounding.
# The device path resizes in float and rounds to 8-bit levels, the CPU paths resize on 8-bit
# values (torch's uint8 kernel, or Pillow's): each rounds once, so they may differ by one
# level and no more, with the same decoder (tests/preprocess bounds the CPU paths the same way).
ONE_LEVEL = 1 / (255 * min(ResNet50_Weights.DEFAULT.transforms().std)) + 1e-5


def cpu_path(*, fast: bool = True) -> Preprocessor:
    return Preprocessor(
        transform=TRANSFORM, max_image_pixels=10**8, jpeg_draft=False, fast_resize=fast
    )


def checked(data: bytes) -> EncodedJpeg:
    kept = Preprocessor(
        transform=TRANSFORM, max_image_pixels=10**8, keep_jpegs_encoded=True
    ).prepare(data)
    assert isinstance(kept, EncodedJpeg)
    return kept


class RecordingDecoder:
    """The real decoder, recording each call's pixel count; fails calls holding ``poison``."""

    def __init__(self, poison: Sequence[bytes] = ()) -> None:
        self.calls: list[int] = []
        self.poison = set(poison)
        self.real = TorchvisionJpegDecoder()

    def __call__(self, encoded: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
        if self.poison & set(encoded):
            raise RuntimeError("nvjpeg refuses this file")
        decoded = self.real(encoded, device)
        self.calls.append(sum(t.shape[1] * t.shape[2] for t in decoded))
        return decoded


def device_path(
    *,
    budget: Callable[[], int] = lambda: 10**9,
    decoder: RecordingDecoder | None = None,
    device: torch.device = CPU,
) -> DevicePreprocessor:
    assert NUMBERS is not None
    return DevicePreprocessor(
        numbers=NUMBERS,
        device=device,
        fallback=cpu_path(),
        pixel_budget=budget,
        decoder=decoder,
    )


def results(values: Sequence[torch.Tensor | ServiceError]) -> list[torch.Tensor]:
    assert all(isinstance(v, torch.Tensor) for v in values), values
    return [v for v in values if isinstance(v, torch.Tensor)]


# --- the pixel budget --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixels", "budget", "expected"),
    [
        pytest.param([], 10, [], id="nothing"),
        pytest.param([3, 3, 3], 10, [range(3)], id="all-fit"),
        pytest.param([4, 4, 4, 4], 8, [range(2), range(2, 4)], id="split-at-budget"),
        pytest.param([2, 20, 2], 10, [range(1), range(1, 2), range(2, 3)], id="oversize-alone"),
        pytest.param([20], 10, [range(1)], id="lone-oversize"),
    ],
)
def test_pixel_chunks(pixels: list[int], budget: int, expected: list[range]) -> None:
    assert pixel_chunks(pixels, budget) == expected


def test_the_budget_follows_free_memory() -> None:
    free = [10**9]
    budget = memory_pixel_budget(lambda: free[0])
    assert budget() == 10**9 // 2 // DEVICE_BYTES_PER_PIXEL
    free[0] = 0
    assert budget() == 1  # a full device still decodes, one image at a time


def test_a_batch_of_photos_is_decoded_within_a_fake_device_budget() -> None:
    """Half the device's memory free, measured at the call: no decode call exceeds it."""
    files = [checked(encode(photo().resize((900, 600)))) for _ in range(5)]
    free_bytes = 2 * 900 * 600 * 2 * DEVICE_BYTES_PER_PIXEL  # two photos' worth, halved
    decoder = RecordingDecoder()
    chunked = results(
        device_path(budget=memory_pixel_budget(lambda: free_bytes), decoder=decoder)(files)
    )
    assert decoder.calls == [2 * 900 * 600, 2 * 900 * 600, 900 * 600]
    whole = RecordingDecoder()
    at_once = results(device_path(decoder=whole)(files))
    assert whole.calls == [5 * 900 * 600]
    for a, b in zip(chunked, at_once, strict=True):
        assert torch.equal(a, b)


# --- failures: one file, not the batch ---------------------------------------------------------


def test_a_file_the_device_refuses_is_decoded_on_the_cpu_and_the_others_on_the_device() -> None:
    files = [checked(photo_bytes(name)) for name in PHOTOS[:3]]
    decoder = RecordingDecoder(poison=[files[1].data])
    with structlog.testing.capture_logs() as logs:
        got = results(device_path(decoder=decoder)(files))
    # The batched call failed; then one by one: two on the device, one refused there.
    assert len(decoder.calls) == 2
    assert float((got[1] - cpu_path()(files[1].data)).abs().max()) == 0  # the CPU path's own
    assert [e["fallback"] for e in logs if e["event"] == "device_decode_failed"] == ["cpu"]


def test_a_corrupt_file_is_refused_alone() -> None:
    good = photo_bytes()
    sos = good.index(b"\xff\xda")
    corrupt = good[: sos + 200] + b"\xff\x00\xff\xc0\x00" * 50 + good[sos + 450 :]
    files = [checked(good), checked(corrupt), checked(photo_bytes(PHOTOS[0]))]
    got = device_path()(files)
    assert isinstance(got[1], BadImageError)
    assert "corrupt or truncated" in got[1].message
    assert isinstance(got[0], torch.Tensor)
    assert isinstance(got[2], torch.Tensor)


# --- the same tensor as the CPU path -----------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_exif_orientation_is_applied_as_the_cpu_path_does(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo().resize((400, 240)), "JPEG", exif=exif)
    (got,) = results(device_path()([checked(data)]))
    assert float((got - cpu_path()(data)).abs().max()) <= ONE_LEVEL


@pytest.mark.parametrize("size", [(2000, 200), (150, 1500)], ids=["wide", "tall"])
def test_extreme_aspect_ratios_are_cropped_as_the_cpu_path_does(size: tuple[int, int]) -> None:
    data = encode(photo().resize(size))
    (got,) = results(device_path()([checked(data)]))
    assert float((got - cpu_path()(data)).abs().max()) <= ONE_LEVEL


@pytest.mark.parametrize("size", [(2000, 200), (150, 1500), (400, 100), (640, 480)])
def test_the_long_axis_is_cut_as_on_the_cpu_path(size: tuple[int, int]) -> None:
    width, height = size
    cut = limit_aspect(torch.zeros(3, height, width, dtype=torch.uint8))
    expected = cpu_decode.limit_aspect(Image.new("RGB", size))
    assert (cut.shape[2], cut.shape[1]) == expected.size


def test_parity_with_the_cpu_path_on_photos(classifier: ModelRunner) -> None:
    """Same top-1 on the seeded model; within one 8-bit level of both CPU paths."""
    files = [photo_bytes(name) for name in PHOTOS]
    got = torch.stack(results(device_path()([checked(f) for f in files])))
    fast = torch.stack([cpu_path()(f) for f in files])
    exact = torch.stack([cpu_path(fast=False)(f) for f in files])  # torchvision's own
    for reference in (fast, exact):
        deviation = (got - reference).abs()
        assert float(deviation.max()) <= ONE_LEVEL
        assert float(deviation.mean()) < ONE_LEVEL / 4  # most values are identical
    probabilities, expected = classifier.forward(got), classifier.forward(fast)
    assert torch.equal(probabilities.argmax(1), expected.argmax(1))
    # The seeded model gives these photos one top-1: each row must also be nearest to its
    # own photo's row, which a mixed-up or damaged row is not.
    logs = probabilities.clamp_min(1e-30).log(), expected.clamp_min(1e-30).log()
    assert torch.cdist(*logs).argmin(1).tolist() == list(range(len(files)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_cuda_decode_stays_close_to_the_cpu_path(classifier: ModelRunner) -> None:
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels at edges,
    under a level on average, and the same top-1 (bounds to confirm on the first GPU run)."""
    files = [photo_bytes(name) for name in PHOTOS]
    cuda = device_path(device=torch.device("cuda"))
    got = torch.stack(results(cuda([checked(f) for f in files]))).cpu()
    fast = torch.stack([cpu_path()(f) for f in files])
    deviation = (got - fast).abs()
    assert float(deviation.mean()) < ONE_LEVEL
    assert float(deviation.max()) < 12 * ONE_LEVEL
    probabilities, expected = classifier.forward(got), classifier.forward(fast)
    assert torch.equal(probabilities.argmax(1), expected.argmax(1))
    logs = probabilities.clamp_min(1e-30).log(), expected.clamp_min(1e-30).log()
    assert torch.cdist(*logs).argmin(1).tolist() == list(range(len(files)))
