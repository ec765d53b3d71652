"""Any torchvision image classifier as a model spec: its own transform, input size, labels,
weights names, and a clear refusal of any other name."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision.models
from aiohttp import FormData
from PIL import Image

from batching_server.__main__ import main
from batching_server.http.app import create_app
from batching_server.http.appkeys import READINESS
from batching_server.models import (
    RESNET50,
    UnknownModelError,
    classification_models,
    torchvision_classifier,
)
from batching_server.preprocess import Preprocessor
from tests.conftest import make_settings
from tests.images import photo_bytes
from tests.metrics_text import parse_metrics

# One 8-bit level after normalisation, at the smallest std torchvision's transforms use.
ONE_LEVEL = 1 / 255 / 0.224 + 1e-6

# Models whose inputs differ: the usual 256 -> 224 bilinear, bicubic resizing (no fast path),
# a 255 -> 240 crop, and a 236 -> 224 resize.
ARCHITECTURES = [
    pytest.param("resnet18", "DEFAULT", 224, 256, "bilinear", id="resnet18"),
    pytest.param("efficientnet_b0", "DEFAULT", 224, 256, "bicubic", id="efficientnet_b0"),
    pytest.param("efficientnet_b1", "IMAGENET1K_V2", 240, 255, "bilinear", id="efficientnet_b1"),
    pytest.param("efficientnet_b1", "IMAGENET1K_V1", 240, 256, "bicubic", id="efficientnet_b1-v1"),
    pytest.param("convnext_tiny", "random", 224, 236, "bilinear", id="convnext_tiny"),
]


def _pil(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def test_every_classification_model_and_nothing_else() -> None:
    models = classification_models()
    assert {"resnet50", "resnet18", "efficientnet_b0", "convnext_tiny", "vit_b_16"} <= set(models)
    # Detection, segmentation, video and quantized models live in submodules: not classifiers.
    assert not {"fasterrcnn_resnet50_fpn", "deeplabv3_resnet50", "r3d_18"} & set(models)
    assert list(models) == sorted(models)


def test_an_unknown_name_lists_the_closest_first() -> None:
    with pytest.raises(UnknownModelError) as raised:
        torchvision_classifier("resnet5")
    message = str(raised.value)
    assert "'resnet5' is not one of torchvision's classification models" in message
    assert message.index("closest: resnet50") < message.index("resnet18")
    assert "vit_b_16" in message  # every valid name is listed


@pytest.mark.parametrize(("name", "weights", "crop", "resize", "interpolation"), ARCHITECTURES)
def test_the_spec_follows_the_weights_own_transform(
    name: str, weights: str, crop: int, resize: int, interpolation: str
) -> None:
    spec = torchvision_classifier(name)
    enum = torchvision.models.get_model_weights(name)
    named = enum.DEFAULT if weights == "random" else enum[weights]
    reference = named.transforms()
    transform = spec.transform(weights)
    assert (transform.crop_size, transform.resize_size) == ([crop], [resize])
    assert transform.interpolation.value == interpolation
    assert (transform.mean, transform.std) == (reference.mean, reference.std)
    assert spec.input_size(weights) == crop
    assert spec.labels == tuple(enum.DEFAULT.meta["categories"])
    assert {"DEFAULT", "IMAGENET1K_V1"} <= set(spec.weight_names)

    data = photo_bytes("coffee.png")
    fast = Preprocessor(transform=transform, max_image_pixels=10**8, jpeg_draft=False)
    tensor = fast(data)
    assert tensor.shape == (3, crop, crop)
    # The fast path where it can match torchvision's transform, torchvision's own elsewhere.
    assert (fast._fast is not None) == (interpolation == "bilinear")
    assert float((tensor - reference(_pil(data))).abs().max()) <= ONE_LEVEL


@pytest.mark.parametrize(
    "name", ["resnet18", "efficientnet_b0", "efficientnet_b1", "convnext_tiny"]
)
def test_random_weights_build_a_network_for_its_input_size(name: str) -> None:
    spec = torchvision_classifier(name)
    size = spec.input_size("random")
    module = spec.build("random", seed=0).eval()
    with torch.inference_mode():
        logits = module(torch.zeros(1, 3, size, size))
    assert logits.shape == (1, len(spec.labels))
    again = spec.build("random", seed=0)
    assert torch.equal(next(module.parameters()), next(again.parameters()))


def test_resnet50_is_one_of_them() -> None:
    assert torchvision_classifier("resnet50") == RESNET50
    assert RESNET50.input_size("IMAGENET1K_V1") == 224


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "efficientnet_b1"])
async def test_served_end_to_end(aiohttp_client: Any, name: str) -> None:
    spec = torchvision_classifier(name)
    settings = make_settings(model={"name": name}, batching={"max_batch_size": 2})
    app = create_app(settings)  # the model comes from model.name
    client = await aiohttp_client(app)
    await app[READINESS].wait_ready()
    form = FormData()
    form.add_field("file", photo_bytes("chelsea.png"), filename="cat.png")
    response = await client.post("/predict?top_k=2", data=form)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["prediction"] in spec.labels
    assert [entry["label"] in spec.labels for entry in body["top_k"]] == [True, True]
    index = await (await client.get("/")).json()
    assert index["model"]["name"] == name
    text = await (await client.get("/metrics")).text()
    info = [
        dict(labels)
        for (metric, labels), _ in parse_metrics(text).items()
        if metric == "model_info"
    ]
    assert info[0]["model_name"] == name
    assert "resnet50" not in text


def test_a_bad_model_name_stops_the_cli_with_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("BATCHING_SERVER_MODEL__NAME", "resnet5")
    monkeypatch.chdir(tmp_path)  # no ./settings.toml there
    assert main([]) == 2
    error = capsys.readouterr().err
    assert "model.name must be the name of a torchvision classification model" in error
    assert "closest: resnet50" in error
