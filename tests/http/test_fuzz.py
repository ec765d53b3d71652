"""Property-based fuzzing of uploads: mutated real images and mutated multipart bodies.

Whatever the bytes, the server answers with a 200 or a JSON 4xx, never a 5xx, and right after
each one still classifies a good image. The example count is bounded and derandomised for CI.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AppClient
from tests.images import encode, photo

# Small real photos: shrinking works faster, and a failing example stays readable.
SEEDS = (
    encode(photo("chelsea.png").resize((96, 64)), "JPEG"),
    encode(photo("coffee.png").resize((120, 80)), "PNG"),
    encode(photo("astronaut.png").resize((64, 64)), "GIF"),
    encode(photo("rocket.jpg").resize((90, 120)), "WEBP"),
)
BOUNDARY = "fuzzboundary"
HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,  # CI sees exactly these examples, nothing replayed from earlier runs
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def multipart(content: bytes) -> bytes:
    return (
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few byte flips, a cut, an insertion or a duplicated slice."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(("flip", "cut", "insert", "duplicate")))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 4096))]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 512))]
    return bytes(data)


images = st.sampled_from(SEEDS).flatmap(mutated)
bodies = st.sampled_from(SEEDS[:2]).map(multipart).flatmap(mutated)


@pytest.fixture
async def client(app_client: AppClient) -> Any:
    return await app_client(limits={"max_image_pixels": 4_000_000}, batching={"max_wait_ms": 0})


async def assert_sane_and_still_serving(client: Any, response: Any) -> None:
    assert response.status == 200 or 400 <= response.status < 500, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert ("prediction" in body) if response.status == 200 else ("error" in body)
    good = await client.post("/predict", data=multipart(SEEDS[0]), headers=HEADERS)
    assert good.status == 200, await good.text()


@pytest.mark.slow
@FUZZ
@given(image=images)
async def test_mutated_images_never_fail_the_server(client: Any, image: bytes) -> None:
    response = await client.post("/predict", data=multipart(image), headers=HEADERS)
    await assert_sane_and_still_serving(client, response)


@pytest.mark.slow
@FUZZ
@given(body=bodies)
async def test_mutated_multipart_bodies_never_fail_the_server(client: Any, body: bytes) -> None:
    response = await client.post("/predict", data=body, headers=HEADERS)
    await assert_sane_and_still_serving(client, response)
