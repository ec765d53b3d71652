"""benchmarks.gpu_check's device-preprocessing parts, on the CPU (its sanity-check mode)."""

from __future__ import annotations

import pytest
import torch

from batching_server.models import ModelRunner
from batching_server.models.device_preprocess import DevicePreprocessor
from benchmarks import gpu_check


def test_the_device_preprocessing_check_passes_on_the_cpu_twin(classifier: ModelRunner) -> None:
    result = gpu_check.check_device_preprocess(classifier)
    assert result.passed, result.detail


def test_the_device_preprocessing_check_catches_a_wrong_transform(
    classifier: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    transform = DevicePreprocessor.transform

    def brighter(
        self: DevicePreprocessor, pixels: torch.Tensor, orientation: int = 1
    ) -> torch.Tensor:
        return transform(self, pixels, orientation) + 0.1

    monkeypatch.setattr(DevicePreprocessor, "transform", brighter)
    result = gpu_check.check_device_preprocess(classifier)
    assert not result.passed
    assert "tensor deviation" in result.detail


def test_device_preprocessing_throughput_on_the_cpu(classifier: ModelRunner) -> None:
    row = gpu_check.measure_device_preprocess(classifier, (64, 48), batch_size=2, seconds=0.0)
    assert row["jpeg_size"] == "64x48"
    assert row["iterations"] >= 3
    assert row["images_per_s"] > 0
    assert row["gpu_utilisation"] is None
    assert row["why"] == "not a CUDA device"
