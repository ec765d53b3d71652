"""INT8 against fp32, both compiled as the server runs them: the model's images/s by batch
size, and how often the two agree on an image's top class.

Both classifiers come from the package's own ``load_runner`` and compile cache (as
``benchmarks.model_ceiling`` builds them) and are timed in alternating rounds, so that a
drift of the machine's speed hits both. Agreement is counted on photos: scikit-image's that
the calibration never saw, and the calibration photos themselves (with their mirror
images). With ``weights = "random"`` agreement says little about accuracy: measure that with
the real weights on labelled data.

    python -m benchmarks.int8 --batch-sizes 1,8 --seconds 3 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from batching_server.models import RESNET50, ModelRunner
from batching_server.models.quantize import calibration_batch
from batching_server.models.threads import available_cores
from batching_server.observability.logs import configure_logging
from benchmarks._common import RESULTS, machine, table, write_json
from benchmarks.model_ceiling import build_classifier, measure

__all__ = ["HELD_OUT", "agreement", "main"]

VARIANTS = ("fp32-cl-compile", "int8-cl-compile")
# scikit-image's photos (and grey pictures, as RGB) outside the calibration set.
HELD_OUT = (
    "motorcycle_left.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "cell.png",
    "color.png",
    "page.png",
)


def held_out_batch() -> torch.Tensor:
    """The held-out pictures through the weights' own transform."""
    transform = RESNET50.transform("random")
    tensors = []
    for name in HELD_OUT:
        with Image.open(Path(str(resources.files("skimage") / "data" / name))) as picture:
            tensors.append(transform(picture.convert("RGB")))
    return torch.stack(tensors)


def agreement(fp32: ModelRunner, int8: ModelRunner, pixels: torch.Tensor) -> dict[str, Any]:
    """Top-1 agreement image by image (each a batch of one, as a lone request runs)."""
    same = 0
    top5_overlap = []
    classes = set()
    rows_fp32, rows_int8 = [], []
    for image in pixels:
        a = fp32.forward(image[None])[0]
        b = int8.forward(image[None])[0]
        rows_fp32.append(a)
        rows_int8.append(b)
        same += int(a.argmax() == b.argmax())
        classes.add(int(a.argmax()))
        top5_overlap.append(len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist())))
    return {
        "images": len(pixels),
        "top1_agree": same,
        # Random weights may give most pictures one class, which makes agreement cheap.
        "fp32_distinct_top1": len(classes),
        "top5_overlap_mean": round(statistics.fmean(top5_overlap), 2),
        "image_signal_to_noise_db": round(_image_snr_db(rows_fp32, rows_int8), 1),
    }


def _image_snr_db(fp32: list[torch.Tensor], int8: list[torch.Tensor]) -> float:
    """How far fp32's answers differ between images, against how far int8's differ from
    fp32's, in dB: where it is high, int8 keeps what tells the images apart (a check that
    random weights, which answer nearly alike for every image, still allow)."""
    a, b = torch.stack(fp32).double(), torch.stack(int8).double()
    signal = (a - a.mean(dim=0)).pow(2).sum()
    noise = (b - a).pow(2).sum()
    return float(10 * torch.log10(signal / noise))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8.json")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.batch_sizes.split(",")})
    threads = args.threads or available_cores()
    configure_logging(level="WARNING", fmt="text", stream=sys.stderr)
    torch.set_num_threads(threads)
    runners = {v: build_classifier(v, sizes, device="cpu", threads=threads) for v in VARIANTS}
    try:
        rounds: dict[tuple[str, int], list[float]] = {}
        for number in range(args.rounds):
            order = VARIANTS if number % 2 == 0 else VARIANTS[::-1]
            for size in sizes:
                for variant in order:
                    row = measure(
                        variant,
                        size,
                        args.seconds,
                        threads=threads,
                        classifier=runners[variant],
                    )
                    rounds.setdefault((variant, size), []).append(row["images_per_s"])
                    print(
                        f"round {number + 1} {variant} batch {size}: "
                        f"{row['images_per_s']:.1f} images/s",
                        file=sys.stderr,
                        flush=True,
                    )
        fp32, int8 = (runners[v] for v in VARIANTS)
        agree = {
            "held_out": agreement(fp32, int8, held_out_batch()),
            "calibration": agreement(fp32, int8, calibration_batch(RESNET50.transform("random"))),
        }
    finally:
        for runner in runners.values():
            runner.close()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        fp32_rate = statistics.median(rounds[(VARIANTS[0], size)])
        int8_rate = statistics.median(rounds[(VARIANTS[1], size)])
        rows.append(
            {
                "batch_size": size,
                "fp32_images_per_s": fp32_rate,
                "int8_images_per_s": int8_rate,
                "speedup": round(int8_rate / fp32_rate, 2),
                "fp32_rounds": rounds[(VARIANTS[0], size)],
                "int8_rounds": rounds[(VARIANTS[1], size)],
            }
        )
    print(table(rows, ["batch_size", "fp32_images_per_s", "int8_images_per_s", "speedup"]))
    print(f"top-1 agreement: {agree}")
    write_json(
        args.out,
        {
            "machine": machine(),
            "threads": threads,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "weights": "random",
            "rows": rows,
            "agreement": agree,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
