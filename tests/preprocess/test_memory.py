"""Peak memory of concurrent decodes stays under the pixel budget's bound.

Pillow allocates pixels in C, where tracemalloc sees nothing: a subprocess decodes and reports
its peak resident set (VmHWM) over its resident set before the decodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from batching_server.preprocess.decode import PEAK_BYTES_PER_PIXEL
from tests.images import encode

SIDE = 4000  # 16 megapixels: over Pillow's 16 MB block, as the large uploads are
IMAGES = 6
THREADS = 6
BUDGET = 2 * SIDE * SIDE  # two at once, of the six threads

WORKER = """
import asyncio, io, json, sys
from pathlib import Path

from PIL import Image

from batching_server.models import RESNET50
from batching_server.preprocess import DecodePool, Preprocessor

budget, threads, *paths = sys.argv[1:]
uploads = [Path(path).read_bytes() for path in paths]


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


async def main():
    pool = DecodePool(
        preprocessor=Preprocessor(
            transform=RESNET50.transform("random"),
            max_image_pixels=50_000_000,
            max_pixels_in_flight=int(budget) or None,
        ),
        threads=int(threads),
    )
    # Warm up before the baseline: libraries loaded, threads started, kernels used once.
    small = io.BytesIO()
    Image.new("RGBA", (300, 300), (1, 2, 3, 4)).save(small, "PNG")
    await asyncio.gather(*(pool.decode(small.getvalue()) for _ in range(int(threads))))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux 4.0+)
    except OSError:
        pass  # the peak so far then counts too: the bound only gets harder to meet
    before = status("VmRSS")
    results = await asyncio.gather(*(pool.decode(data) for data in uploads))
    pool.close()
    shapes = [list(tensor.shape) for tensor, _ in results]
    print(json.dumps({"peak": status("VmHWM") - before, "shapes": shapes}))


asyncio.run(main())
"""


def alpha_uploads(folder: Path) -> list[str]:
    """Small PNGs of 16 megapixels each, every kind of transparency: LA, RGBA, palette+tRNS."""
    kinds = [
        encode(Image.new("LA", (SIDE, SIDE), (90, 128)), "PNG"),
        encode(Image.new("RGBA", (SIDE, SIDE), (200, 10, 40, 100)), "PNG"),
        encode(Image.new("P", (SIDE, SIDE), 3), "PNG", transparency=3),
    ]
    paths = []
    for index in range(IMAGES):
        path = folder / f"{index}.png"
        path.write_bytes(kinds[index % len(kinds)])
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_concurrent_alpha_decodes_stay_under_the_pixel_budget(tmp_path: Path) -> None:
    """Each decode peaks at PEAK_BYTES_PER_PIXEL, and the budget caps the pixels at once.

    The margin (two bytes a pixel more) is for allocator slack and the tensor step. Each fault
    alone breaks the bound: without the budget six images decode at once (three times the
    pixels); converting through full-size RGBA copies costs about 20 bytes a pixel; and
    Pillow's 16 MB blocks, recycled through per-thread malloc arenas, keep freed memory.
    """
    paths = alpha_uploads(tmp_path)
    assert max(Path(path).stat().st_size for path in paths) < 200_000
    run = subprocess.run(
        [sys.executable, "-c", WORKER, str(BUDGET), str(THREADS), *paths],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["shapes"] == [[3, 224, 224]] * IMAGES
    bound = BUDGET * (PEAK_BYTES_PER_PIXEL + 2)
    assert report["peak"] <= bound, f"{report['peak'] / 2**20:.0f} MiB over {bound / 2**20:.0f}"
