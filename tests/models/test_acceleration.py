"""The forward-pass fast path: precision choice, channels_last, padding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from batching_server.models import RESNET50, ModelRunner, load_runner
from batching_server.models.acceleration import choose_precision
from batching_server.preprocess import Preprocessor
from tests.conftest import make_settings
from tests.images import PHOTOS, photo_bytes

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    preprocessor = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**8)
    return torch.stack([preprocessor(photo_bytes(name)) for name in PHOTOS])


def variant(**model: Any) -> Iterator[ModelRunner]:
    settings = make_settings(model=model)
    loaded = load_runner(settings.model, batching=settings.batching)
    yield loaded
    loaded.close()


@pytest.mark.parametrize(
    ("requested", "device", "flags", "expected"),
    [
        pytest.param("auto", "cpu", {"avx512f", "amx_bf16", "amx_tile"}, "bf16", id="amx"),
        pytest.param("auto", "cpu", {"avx512f", "avx512_bf16"}, "bf16", id="avx512-bf16"),
        pytest.param("auto", "cpu", {"avx2", "fma"}, "fp32", id="no-native-bf16"),
        pytest.param("auto", "cuda", set(), "fp16", id="cuda"),
        pytest.param("fp32", "cpu", {"amx_bf16"}, "fp32", id="explicit-wins"),
    ],
)
def test_choose_precision(requested: str, device: str, flags: set[str], expected: str) -> None:
    precision, reason = choose_precision(requested, torch.device(device), frozenset(flags))
    assert precision == expected
    assert reason  # logged at start-up, so an operator knows why


@pytest.mark.slow
def test_channels_last_and_padding_keep_the_answers(
    classifier: ModelRunner, photos: torch.Tensor
) -> None:
    reference = classifier.forward(photos)
    for fast in variant(precision="fp32", channels_last=True):
        torch.testing.assert_close(fast.forward(photos), reference, atol=1e-4, rtol=1e-3)
    settings = make_settings(batching={"batch_sizes": [1, 8], "max_batch_size": 8})
    padded = load_runner(settings.model, batching=settings.batching)
    try:
        # 5 photos ride in a batch of 8; the 3 zero images must not leak into the answer.
        torch.testing.assert_close(padded.forward(photos), reference, atol=1e-4, rtol=1e-3)
    finally:
        padded.close()


@pytest.mark.slow
def test_bf16_agrees_with_fp32(classifier: ModelRunner, photos: torch.Tensor) -> None:
    reference = classifier.forward(photos)
    for bf16 in variant(precision="bf16", channels_last=True):
        assert bf16.precision == "bf16"
        fast = bf16.forward(photos)
        assert fast.dtype == torch.float32
        assert torch.equal(fast.argmax(dim=1), reference.argmax(dim=1))
        assert (fast - reference).abs().max() < 0.05
