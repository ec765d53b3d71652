"""model.precision = "int8": calibration on the bundled photos, PT2E quantization, and a
server that runs int8 only as compiled graphs (built before it is ready, then cached)."""

from __future__ import annotations

import json
import platform
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from torch import nn
from torchvision.transforms._presets import ImageClassification

from batching_server.http.appkeys import READINESS, RUNNER
from batching_server.models import aot, loading
from batching_server.models.compile_cache import MANIFEST
from batching_server.models.quantize import (
    CALIBRATION_PHOTOS,
    LazyQuantized,
    calibration_batch,
    quantization_identity,
    quantize_int8,
)
from tests.models.test_aot import INPUT, TinySpec, compiled_gauge, ready_app, tiny_settings

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="int8 runs on x86 CPUs only"
)


@dataclass(frozen=True)
class TinyPhotoSpec(TinySpec):
    """The tiny network with a transform to its own input size, so photos calibrate it."""

    def transform(self, weights: str) -> nn.Module:
        return ImageClassification(crop_size=INPUT, resize_size=INPUT + 2)

    def build(self, weights: str, *, seed: int) -> nn.Module:
        stem = super().build(weights, seed=seed)  # conv, batch norm, ReLU, pool, flatten, linear
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            # A max-pool, as ResNet's stem has: int8, inductor would call it through Python.
            middle = [
                nn.MaxPool2d(3, stride=2, padding=1),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.ReLU(),
            ]
        return nn.Sequential(*stem[:3], *middle, *stem[3:])


def quantize_ops(module: nn.Module) -> set[str]:
    assert isinstance(module, torch.fx.GraphModule)
    return {
        str(node.target)
        for node in module.graph.nodes
        if node.op == "call_function" and "quantize" in str(node.target)
    }


def test_calibration_is_every_bundled_photo_and_its_mirror_image() -> None:
    photos = sorted(CALIBRATION_PHOTOS.glob("*.jpg"))
    assert len(photos) >= 5
    batch = calibration_batch(TinyPhotoSpec().transform("random"))
    assert batch.shape == (2 * len(photos), 3, INPUT, INPUT)
    # Mirrored, not repeated: each photo's two tensors differ, and so do the photos.
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(batch[0], batch[2])
    assert (SOURCES := CALIBRATION_PHOTOS / "SOURCES.md").is_file()
    assert all(photo.name in SOURCES.read_text() for photo in photos)


def test_a_package_that_calls_operators_through_python_is_refused(tmp_path: Path) -> None:
    package = tmp_path / "model.pt2"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("model/data/aotinductor/model/x.wrapper.so", b"")
        node = {"node": {"target": "quantized::max_pool2d"}}
        archive.writestr(
            "model/data/aotinductor/model/x.wrapper.json", json.dumps({"nodes": [node]})
        )
    with pytest.raises(RuntimeError, match=r"through Python.*quantized::max_pool2d"):
        aot.load_package(package, device=torch.device("cpu"), concurrent=1)


def test_the_quantization_identity_is_stable_and_names_its_inputs() -> None:
    identity = quantization_identity()
    assert identity.startswith("x86-static-maxpool-fp32:torchao-")
    assert "photos-" in identity
    quantization_identity.cache_clear()
    assert quantization_identity() == identity


def test_quantize_int8_puts_int8_around_the_layers_and_keeps_the_answers_close() -> None:
    spec = TinyPhotoSpec()
    module = spec.build("random", seed=0).eval().requires_grad_(False)
    calibration = calibration_batch(spec.transform("random"))
    quantized = quantize_int8(module, calibration=calibration, memory_format=torch.channels_last)
    ops = quantize_ops(quantized)
    assert any("quantize_per_tensor" in op for op in ops), ops  # activations
    assert any("quantize_per_channel" in op for op in ops), ops  # weights
    with torch.no_grad():
        expected = module(calibration)
        got = quantized(calibration.contiguous(memory_format=torch.channels_last))
        # Any batch size: one calibration serves every shape.
        alone = quantized(calibration[:1].contiguous(memory_format=torch.channels_last))
    spread = float(expected.max() - expected.min())
    assert float((got - expected).abs().max()) < 0.05 * spread
    assert torch.allclose(alone[0], got[0], atol=1e-5)


def _int8_start_settings(cache: Path, **model: Any) -> Any:
    return tiny_settings(cache, precision="int8", compile="auto", warmup=True, **model)


def _only_manifest(cache: Path) -> dict[str, Any]:
    [manifest] = cache.glob(f"*/{MANIFEST}")
    loaded: dict[str, Any] = json.loads(manifest.read_text())
    return loaded


async def test_an_int8_start_builds_before_ready_and_a_second_start_never_calibrates(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = _int8_start_settings(tmp_path)
    spec = TinyPhotoSpec()
    with structlog.testing.capture_logs() as logs:
        app = await ready_app(aiohttp_client, settings, spec=spec)
    assert app[READINESS].ready, app[READINESS].reason
    runner = app[RUNNER]
    assert runner.precision == "int8"
    assert runner.forward_pass.compiled  # on a CPU, auto would have been ready eagerly
    assert compiled_gauge(app) == 1
    assert [e["batch_size"] for e in logs if e["event"] == "compiled_graph_built"] == [2]
    key = _only_manifest(tmp_path)["key"]
    assert key["precision"] == "int8"
    assert key["quantization"] == quantization_identity()
    # The compiled graph answers as the quantized network does.
    network = runner.forward_pass.network
    assert isinstance(network, LazyQuantized)
    pixels = calibration_batch(spec.transform("random"))[:2]
    with torch.no_grad():
        reference = torch.softmax(
            network(pixels.contiguous(memory_format=torch.channels_last)), dim=1
        )
    served = runner.forward(pixels)
    assert torch.allclose(served, reference, atol=0.02), (served - reference).abs().max()

    second = await ready_app(aiohttp_client, settings, spec=spec)
    assert second[READINESS].ready
    assert second[RUNNER].forward_pass.compiled
    assert second[RUNNER].forward_pass.network._quantized is None  # loaded, not calibrated


async def test_an_int8_start_whose_compile_fails_does_not_serve_fp32(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(loading, "load_graphs", fails)
    app = await ready_app(aiohttp_client, _int8_start_settings(tmp_path), spec=TinyPhotoSpec())
    readiness = app[READINESS]
    assert readiness.failed
    assert "compiling the model failed: RuntimeError" in readiness.reason
