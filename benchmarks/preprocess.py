"""Preprocessing cost per image on one core: torchvision's transform against the fast paths.

python -m benchmarks.preprocess
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from batching_server.models import RESNET50
from batching_server.preprocess import Preprocessor
from benchmarks._common import PHOTOS, RESULTS, machine, table, write_json


def camera_jpeg(name: str, size: tuple[int, int], quality: int) -> bytes:
    """A real photo scaled to ``size`` with sensor-like noise, so it compresses like one."""
    from importlib import resources

    path = Path(str(resources.files("skimage") / "data" / name))
    with Image.open(path) as image:
        scaled = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 4, (size[1], size[0], 3))
    noisy = np.clip(np.asarray(scaled, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def best_ms(fn: Any, data: Any, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - started)
    return min(times) * 1000, statistics.median(times) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "preprocess.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core, as in the server's decode pool
    variants = {
        # torchvision's transform on a full decode: the reference.
        "reference": Preprocessor(
            transform=RESNET50.transform("random"),
            max_image_pixels=10**9,
            jpeg_draft=False,
            fast_resize=False,
        ),
        "draft": Preprocessor(
            transform=RESNET50.transform("random"),
            max_image_pixels=10**9,
            jpeg_draft=True,
            fast_resize=False,
        ),
        # The server's defaults: JPEG draft and the uint8 resize.
        "server": Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**9),
    }
    cases = [("500x375 q90", (500, 375), 90), ("4032x3024 q85", (4032, 3024), 85)]
    cases.append(("4032x3024 q92", (4032, 3024), 92))
    rows = []
    for label, size, quality in cases:
        for name in PHOTOS[:3]:
            data = camera_jpeg(name, size, quality)
            medians = {key: best_ms(fn, data, args.repeats)[1] for key, fn in variants.items()}
            deviation = (variants["server"](data) - variants["reference"](data)).abs()
            rows.append(
                {
                    "image": f"{label} {name}",
                    "kbytes": len(data) // 1024,
                    **{f"{key}_ms": value for key, value in medians.items()},
                    "speedup": medians["reference"] / medians["server"],
                    "mae": round(float(deviation.mean()), 4),
                    "max_abs": round(float(deviation.max()), 3),
                }
            )
    # Where a small image's time goes: the decode, then the transform of the decoded image.
    stages = []
    server, reference = variants["server"], variants["reference"]
    for name in PHOTOS[:3]:
        data = camera_jpeg(name, (500, 375), 90)
        decoded = server.decode(data)
        stages.append(
            {
                "image": f"500x375 q90 {name}",
                "decode_ms": best_ms(server.decode, data, args.repeats)[1],
                "torchvision_transform_ms": best_ms(reference.to_tensor, decoded, args.repeats)[1],
                "fast_transform_ms": best_ms(server.to_tensor, decoded, args.repeats)[1],
            }
        )
    columns = ("image", "kbytes", "reference_ms", "draft_ms", "server_ms", "speedup", "mae")
    shown = [{**r, "mae": f"{r['mae']:.4f}", "max_abs": f"{r['max_abs']:.3f}"} for r in rows]
    print(table(shown, (*columns, "max_abs")))
    print()
    print(table(stages, ("image", "decode_ms", "torchvision_transform_ms", "fast_transform_ms")))
    write_json(args.out, {"machine": machine(), "rows": rows, "stages": stages})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
