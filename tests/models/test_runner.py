"""ResNet-50 loading, batched-versus-single equality, top-k and warm-up."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.models import _api as torchvision_api
from torchvision.models import resnet50

from batching_server.core.batcher import BatchInfo
from batching_server.core.errors import ModelLoadError
from batching_server.models import (
    RESNET50,
    ForwardPass,
    ImageInput,
    ModelRunner,
    load_runner,
    resolve_device,
)
from batching_server.models.threads import ThreadPlan
from batching_server.preprocess import Preprocessor
from tests.conftest import make_settings
from tests.images import PHOTOS, photo_bytes


@pytest.fixture(scope="module")
def photo_batch() -> torch.Tensor:
    preprocessor = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**8)
    return torch.stack([preprocessor(photo_bytes(name)) for name in PHOTOS])


def test_labels_are_the_imagenet_categories() -> None:
    assert len(RESNET50.labels) == 1000
    assert RESNET50.labels[0] == "tench"
    assert RESNET50.labels[207] == "golden retriever"


@pytest.mark.slow
def test_batched_results_equal_single_image_results(
    classifier: ModelRunner, photo_batch: torch.Tensor
) -> None:
    batched = classifier.forward(photo_batch)
    singles = torch.cat([classifier.forward(image[None]) for image in photo_batch])
    assert batched.shape == (len(PHOTOS), 1000)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-4)
    with torch.inference_mode():
        logits_batched = classifier.forward_pass.module(photo_batch)
        logits_single = torch.cat(
            [classifier.forward_pass.module(image[None]) for image in photo_batch]
        )
    torch.testing.assert_close(logits_batched, logits_single, atol=1e-3, rtol=1e-4)
    # The photos differ, so a model that ignored its input would fail the line above only
    # by luck; make sure it did not.
    assert not torch.allclose(batched[0], batched[1])


def test_probabilities_are_a_distribution(
    classifier: ModelRunner, photo_batch: torch.Tensor
) -> None:
    probabilities = classifier.forward(photo_batch[:2])
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))
    assert probabilities.min() >= 0


def test_no_parameter_needs_a_gradient(classifier: ModelRunner) -> None:
    # Autocast caches casts of weights that need a gradient in a global, mutex-guarded cache;
    # with two model threads that cache deadlocked a compile against a pass leaving autocast.
    assert not any(
        parameter.requires_grad for parameter in classifier.forward_pass.module.parameters()
    )


def test_rank_is_sorted_and_labelled(classifier: ModelRunner) -> None:
    probabilities = torch.softmax(torch.arange(1000, dtype=torch.float32) / 100, dim=0)
    (top,) = classifier.rank(probabilities[None], [3])
    assert [label for label, _ in top] == [
        RESNET50.labels[999],
        RESNET50.labels[998],
        RESNET50.labels[997],
    ]
    scores = [score for _, score in top]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(probabilities[999]))


def test_rank_gives_each_row_its_own_k_from_one_batch(classifier: ModelRunner) -> None:
    rows = torch.stack([torch.arange(1000.0), torch.arange(1000.0).flip(0)]).softmax(dim=1)
    first, second = classifier.rank(rows, [3, 1])
    assert [label for label, _ in first] == [
        RESNET50.labels[999],
        RESNET50.labels[998],
        RESNET50.labels[997],
    ]
    assert [label for label, _ in second] == [RESNET50.labels[0]]
    assert second[0][1] == pytest.approx(float(rows[1, 0]))


def test_random_weights_are_seeded() -> None:
    def first_weight(seed: int) -> torch.Tensor:
        loaded = load_runner(make_settings(model={"seed": seed}).model)
        loaded.close()
        return loaded.forward_pass.module.conv1.weight.detach().clone()

    torch.testing.assert_close(first_weight(7), first_weight(7))
    assert not torch.equal(first_weight(7), first_weight(8))


async def test_warmup_runs_every_batch_size(
    classifier: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int | None]] = []
    real_forward = classifier.forward

    def spy(pixels: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        seen.append((pixels.shape[0], threads))
        return real_forward(pixels, threads=threads)

    monkeypatch.setattr(classifier, "forward", spy)
    await classifier.warmup(range(1, 4))
    plan = classifier.threads
    # and a lone image's pass on every core, where that is another thread count
    solo = [(1, plan.solo_threads)] if plan.solo_threads != plan.threads else []
    assert seen == [(1, None), (2, None), (3, None), *solo]


# --- loading from a checkpoint file ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    return resnet50(weights=None).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 90}, id="training-checkpoint"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="dataparallel"),
    ],
)
def test_loads_a_state_dict_file(
    tmp_path: Path, reference_state_dict: dict[str, torch.Tensor], wrap: Any
) -> None:
    path = tmp_path / "weights.pt"
    torch.save(wrap(reference_state_dict), path)
    loaded = load_runner(make_settings(model={"weights": str(path)}).model)
    loaded.close()
    torch.testing.assert_close(
        loaded.forward_pass.module.fc.weight, reference_state_dict["fc.weight"]
    )
    assert loaded.weights == str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param({"fc.weight": torch.zeros(3, 3)}, "do not fit", id="wrong-keys"),
        pytest.param([1, 2, 3], "not a state_dict", id="not-a-mapping"),
        pytest.param(b"garbage", "could not read", id="not-a-torch-file"),
    ],
)
def test_a_bad_state_dict_file_names_the_fix(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    settings = make_settings(model={"weights": str(path)})
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_runner(settings.model)
    assert "Fix:" in str(caught.value)


def test_named_weights_that_cannot_be_fetched_fail_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No cached copy, and the download fails as it does offline: never fall back to random.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", offline)
    settings = make_settings(model={"weights": "IMAGENET1K_V2"})
    with pytest.raises(ModelLoadError) as caught:
        load_runner(settings.model)
    message = str(caught.value)
    assert "IMAGENET1K_V2" in message
    assert str(tmp_path) in message  # where the cache is looked for
    assert "'random'" in message
    assert "state_dict" in message


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_stack_builds_an_inference_batch_in_the_model_layout(channels_last: bool) -> None:
    """The batch a compiled graph was warmed for: its layout, made in inference mode."""
    settings = make_settings(model={"channels_last": channels_last})
    loaded = load_runner(settings.model)
    try:
        preprocessor = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**8)
        images = [preprocessor(photo_bytes(name)) for name in PHOTOS[:3]]
        batch = loaded.forward_pass.stack(images)
        assert torch.equal(batch, torch.stack(images))
        assert batch.is_contiguous(memory_format=loaded.forward_pass.memory_format)
        assert batch.is_inference()
        # A lone image in the model's layout (the preprocessor's) is used as it is.
        single = loaded.forward_pass.stack(images[:1])
        assert torch.equal(single, images[0].unsqueeze(0))
        assert single.is_contiguous(memory_format=loaded.forward_pass.memory_format)
        # Every stride as a stacked batch's: compiled graphs guard on them all.
        assert (
            single.stride()
            == torch.stack(images[:1])
            .contiguous(memory_format=loaded.forward_pass.memory_format)
            .stride()
        )
        assert single.is_inference()
        assert (single.data_ptr() == images[0].data_ptr()) is channels_last
    finally:
        loaded.close()


async def test_a_lone_single_image_gets_every_core() -> None:
    """A one-image batch with the model otherwise idle runs on the solo thread count; beside
    another pass, or with more images, it gets the per-pass count (the cores shared out)."""
    plan = ThreadPlan(2, 1, 2)
    classifier = ModelRunner(
        name="resnet50",
        labels=RESNET50.labels,
        forward_pass=ForwardPass(module=resnet50(weights=None), device=torch.device("cpu")),
        threads=plan,
    )
    entered, hold = threading.Event(), threading.Event()
    seen: list[tuple[int, int]] = []

    def run(batch: torch.Tensor) -> torch.Tensor:
        seen.append((batch.shape[0], torch.get_num_threads()))
        if batch.shape[0] == 2:  # the pass that keeps the model busy
            entered.set()
            hold.wait(30)
        return torch.zeros(batch.shape[0], 1000)

    classifier.forward_pass._run = run
    info = BatchInfo(size=1, reason="idle", dispatched_at=0.0, queue_waits_s=(0.0,))
    image = ImageInput(pixels=torch.zeros(3, 224, 224), request_id="r")
    try:
        await classifier.predict_batch([image], info)
        busy = asyncio.create_task(classifier.predict_batch([image, image], info))
        assert await asyncio.to_thread(entered.wait, 30)
        await classifier.predict_batch([image], info)  # beside the held pass
        hold.set()
        await busy
        assert seen == [(1, 2), (2, 1), (1, 1)]
    finally:
        hold.set()
        classifier.close()


async def test_lone_images_never_switch_a_threads_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.set_num_threads clears the thread's oneDNN primitive cache: a lone image's pass
    runs on a thread of its own that stays at the solo count."""
    plan = ThreadPlan(2, 1, 2)
    classifier = ModelRunner(
        name="resnet50",
        labels=RESNET50.labels,
        forward_pass=ForwardPass(module=resnet50(weights=None), device=torch.device("cpu")),
        threads=plan,
    )
    seen: list[tuple[str, int]] = []

    def run(batch: torch.Tensor) -> torch.Tensor:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return torch.zeros(batch.shape[0], 1000)

    classifier.forward_pass._run = run
    info = BatchInfo(size=1, reason="idle", dispatched_at=0.0, queue_waits_s=(0.0,))
    image = ImageInput(pixels=torch.zeros(3, 224, 224), request_id="r")
    try:
        await classifier.predict_batch([image], info)  # starts the threads
        await classifier.predict_batch([image, image], info)
        switched: list[int] = []
        set_num_threads = torch.set_num_threads

        def spy(count: int) -> None:
            switched.append(count)
            set_num_threads(count)

        monkeypatch.setattr(torch, "set_num_threads", spy)
        for _ in range(3):
            await classifier.predict_batch([image], info)
        await classifier.predict_batch([image, image], info)
        assert switched == []
        names = [(name.rsplit("_", 1)[0], count) for name, count in seen]
        assert names == [("model-solo", 2), ("model", 1)] + [("model-solo", 2)] * 3 + [("model", 1)]
    finally:
        classifier.close()
