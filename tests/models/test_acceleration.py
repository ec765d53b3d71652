"""The forward-pass fast path: precision choice, channels_last, padding, torch.compile."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import structlog
import torch
from aiohttp import FormData
from torch import nn
from torch._inductor.utils import run_and_get_code

from batching_server.models import RESNET50, ImageInput, ModelRunner, load_runner
from batching_server.models.acceleration import (
    choose_precision,
    compile_module,
)
from batching_server.preprocess import Preprocessor
from tests.conftest import AppClient, make_settings
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


@pytest.mark.slow
async def test_compiled_model_serves_padded_batches(
    app_client: AppClient, classifier: ModelRunner, photos: torch.Tensor
) -> None:
    """torch.compile compiles each allowed shape at warm-up (a lone image's on every core
    too), then serves the same answers without compiling again."""
    settings = make_settings(
        model={"compile": True, "precision": "fp32", "channels_last": True, "warmup": True},
        batching={
            "max_batch_size": 4,
            "batch_sizes": [1, 4],
            "max_wait_ms": 0.0,
            "max_concurrent_batches": 2,
        },
    )
    compiled = load_runner(settings.model, batching=settings.batching)
    try:
        assert compiled.forward_pass.compiled
        client = await app_client(settings, model=compiled)  # returns after warm-up
        # Nothing served may compile again (seconds per graph): not an odd layout, not a
        # batch built outside inference mode, not a padded one, not a lone image's.
        with torch.compiler.set_stance("fail_on_recompile"):
            reference = classifier.forward(photos[:3])
            got = compiled.forward(photos[:3])  # padded to 4
            torch.testing.assert_close(got, reference, atol=1e-3, rtol=1e-3)
            solo = compiled.forward(photos[:1], threads=compiled.threads.solo_threads)
            torch.testing.assert_close(solo, reference[:1], atol=1e-3, rtol=1e-3)
            upload = FormData()
            for name in PHOTOS[:2]:
                upload.add_field("file", photo_bytes(name), filename="photo.jpg")
            response = await client.post("/predict", data=upload)  # a batch of 2, padded
            assert response.status == 200
            upload = FormData()
            upload.add_field("file", photo_bytes(PHOTOS[0]), filename="photo.jpg")
            response = await client.post("/predict", data=upload)  # a lone image
            assert response.status == 200
        samples = (await (await client.get("/metrics")).text()).splitlines()
        assert "batch_padding_images_total 2" in samples
        assert "model_compiles_after_warmup_total 0" in samples
        # A guard warm-up did not foresee (here a thread count no plan uses) compiles again:
        # the pass still answers, and the compile is counted, logged and exported.
        with structlog.testing.capture_logs() as logs:
            ranked = compiled._forward_inputs([ImageInput(photos[0], "r", top_k=1)], threads=3)
        assert len(ranked) == 1
        assert compiled.compiles_after_warmup >= 1
        events = [e for e in logs if e["event"] == "model_compiled_after_warmup"]
        assert events
        assert events[0]["torch_threads"] == 3
        samples = (await (await client.get("/metrics")).text()).splitlines()
        assert f"model_compiles_after_warmup_total {compiled.compiles_after_warmup}" in samples
    finally:
        compiled.close()


@pytest.mark.slow
def test_compile_freezes_in_whatever_thread_compiles() -> None:
    """Configured in one thread, compiled in another (as the server does): still frozen.

    torch keeps config changes in context variables; set only where the module is loaded,
    freezing was off in the model thread, and batch norm stayed in the compiled graph.
    """
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    compiled = compile_module(module, shapes=1, cpp_wrapper=True)
    batch = torch.randn(2, 3, 16, 16)

    def compile_and_run() -> tuple[torch.Tensor, str]:
        with torch.inference_mode():
            result, code = run_and_get_code(compiled, batch)
        return result, "".join(code)

    with ThreadPoolExecutor(1) as model_thread:  # a fresh thread, with a fresh context
        result, code = model_thread.submit(compile_and_run).result()
    assert code  # inductor generated code for it
    assert "batch_norm" not in code  # folded into the convolution by freezing
    # The C++ wrapper, which runs the whole graph without holding the GIL.
    assert "gil_scoped_release" in code
    with torch.inference_mode():
        torch.testing.assert_close(result, module(batch), atol=1e-4, rtol=1e-4)
