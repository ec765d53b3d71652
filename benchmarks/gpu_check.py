"""Check the CUDA code paths of the classifier on a GPU machine, then time them.

Checks: ``precision = "auto"`` picks fp16 on CUDA with channels_last weights; the output
matches an fp32 CPU run of the same network; batches are padded and pinned before the copy;
two forward passes run at once with ``max_concurrent_batches = 2``; JPEGs decoded and
transformed on the device (``preprocess.device = model``) match the CPU path. Then, in one
run: the model's ceiling (images/s by batch size), the device preprocessing's throughput
(decode, resize, crop, normalise on the device, images/s for JPEGs of ``--jpeg-sizes``), and
the GPU's utilisation while each is timed (NVML, through ``torch.cuda.utilization``; install
the ``bench`` extra for it). With ``--compile`` the model is compiled as ``model.compile =
true`` compiles it: warm-up compiles every batch shape, and the checks and timings then run
under dynamo's ``fail_on_recompile`` stance, so a shape or guard that warm-up missed fails the
run. ``--device cpu`` runs what applies on the CPU (the device path's CPU twin), as a sanity
check of the script. Exits 0 when every check passes, 1 when one fails, 2 when there is no
GPU (with ``--device cuda``).

    .venv/bin/python benchmarks/gpu_check.py [--compile] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from batching_server.core.batcher import BatchInfo, ItemFailed
from batching_server.core.shapes import padded_size, warmup_sizes
from batching_server.models import (
    RESNET50,
    ImageInput,
    ModelRunner,
    Prediction,
    compile_runner,
    load_runner,
)
from batching_server.models.device_preprocess import DevicePreprocessor
from batching_server.models.loading import device_preprocessor
from batching_server.observability.logs import configure_logging
from batching_server.preprocess import EncodedJpeg, Preprocessor
from batching_server.settings import settings_from_mapping

if not __package__:
    # Run as a file (python benchmarks/gpu_check.py): make the benchmarks package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import sample_jpegs, write_json
from benchmarks.model_ceiling import fixed_batch, measure

__all__ = ["CheckResult", "UtilisationSampler", "main"]

AGREEMENT_IMAGES = 6  # not an allowed batch size, so the agreement run is padded too
# fp16 against fp32 moves probabilities by far less than this; a wrong path moves them more.
PROBABILITY_TOLERANCE = 0.05
# The device path against the CPU path, in normalised units: one 8-bit level is about 0.0175
# (1 / (255 * 0.224)). The CPU twin stays within one level (tests/models); nvJPEG's IDCT and
# chroma upsampling differ from libjpeg-turbo's, so the GPU gets more room at edges, and the
# mean must stay under one level.
DEVICE_MEAN_TOLERANCE = 0.0175
DEVICE_MAX_TOLERANCE = 0.2


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check, with what was seen."""

    name: str
    passed: bool
    detail: str


def load(
    device: str,
    precision: str,
    batch_sizes: Sequence[int],
    weights: str,
    *,
    channels_last: bool = True,
    concurrent: int = 1,
    compile: bool = False,
) -> ModelRunner:
    """A classifier built the way the server builds it."""
    settings = settings_from_mapping(
        {
            "model": {
                "weights": weights,
                "device": device,
                "precision": precision,
                "channels_last": channels_last,
                "compile": compile,
                "warmup": False,
            },
            "batching": {
                "max_batch_size": max(batch_sizes),
                "batch_sizes": sorted(batch_sizes),
                "max_queue_size": max(64, *batch_sizes),
                "max_concurrent_batches": concurrent,
            },
        }
    )
    classifier = load_runner(settings.model, batching=settings.batching)
    if compile:
        compile_runner(classifier, settings.model, batching=settings.batching)
    return classifier


def check_precision(classifier: ModelRunner, expected: str) -> CheckResult:
    """``auto`` chose ``expected``, and the weights sit on the device in channels_last."""
    weight = next(
        m.weight for m in classifier.forward_pass.module.modules() if isinstance(m, nn.Conv2d)
    )
    problems = []
    if classifier.precision != expected:
        problems.append(f"precision is {classifier.precision}, expected {expected}")
    if weight.device.type != classifier.device.type:
        problems.append(f"weights are on {weight.device}, not {classifier.device}")
    if not weight.is_contiguous(memory_format=torch.channels_last):
        problems.append("conv weights are not channels_last")
    detail = "; ".join(problems) or (
        f"precision {classifier.precision}, weights on {weight.device} in channels_last"
    )
    return CheckResult("auto precision", not problems, detail)


def _log_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.clamp_min(1e-30).log()


def check_agreement(classifier: ModelRunner, reference: ModelRunner) -> CheckResult:
    """Same top-1 as the fp32 reference on seeded inputs, and each row is its own input's.

    With random weights every input tends to get the same top-1, so the per-row match is
    what catches rows that are mixed up or damaged by padding.
    """
    pixels = fixed_batch(AGREEMENT_IMAGES)
    got = classifier.forward(pixels)
    want = reference.forward(pixels)
    problems = []
    if got.shape != want.shape or got.device.type != "cpu" or got.dtype != torch.float32:
        problems.append(f"output is {tuple(got.shape)} {got.dtype} on {got.device}")
        return CheckResult("agreement with fp32 CPU", False, "; ".join(problems))
    if not torch.isfinite(got).all():
        problems.append("output has NaN or inf")
    top1_got, top1_want = got.argmax(1).tolist(), want.argmax(1).tolist()
    if top1_got != top1_want:
        problems.append(f"top-1 {top1_got} differs from fp32 CPU {top1_want}")
    # Row i of the output should be nearest to row i of the reference, not to another row.
    nearest = torch.cdist(_log_probabilities(got), _log_probabilities(want)).argmin(1).tolist()
    if nearest != list(range(len(nearest))):
        problems.append(f"rows are nearest to reference rows {nearest}, not to their own")
    worst = float((got - want).abs().max())
    if worst > PROBABILITY_TOLERANCE:
        problems.append(f"probabilities differ by up to {worst:.4f}")
    detail = "; ".join(problems) or (
        f"top-1 {top1_got} equal on {len(top1_got)} inputs, each row its own input's, "
        f"max probability difference {worst:.4f}"
    )
    return CheckResult("agreement with fp32 CPU", not problems, detail)


def check_pinned_padding(classifier: ModelRunner, images: int = 3) -> CheckResult:
    """A batch is padded to an allowed size and page-locked before it is copied to the GPU."""
    pinned: list[tuple[int, bool]] = []
    original = torch.Tensor.pin_memory

    def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = original(tensor, *args, **kwargs)
        pinned.append((tensor.shape[0], result.is_pinned()))
        return result

    pixels = fixed_batch(images)
    with mock.patch.object(torch.Tensor, "pin_memory", spy):
        together = classifier.forward(pixels)
    expected = padded_size(images, classifier.forward_pass.batch_sizes)
    problems = []
    if not pinned:
        problems.append("forward never called pin_memory")
    elif pinned != [(expected, True)]:
        problems.append(f"pin_memory calls (rows, pinned): {pinned}, expected [({expected}, True)]")
    if together.shape != (images, 1000):
        problems.append(f"output shape {tuple(together.shape)}, expected ({images}, 1000)")
    else:
        # Padding rows must not change the real rows: compare with one image at a time.
        alone = torch.cat([classifier.forward(pixels[i : i + 1]) for i in range(images)])
        worst = float((together - alone).abs().max())
        if worst > PROBABILITY_TOLERANCE:
            problems.append(f"padded rows differ from unpadded ones by up to {worst:.4f}")
    detail = "; ".join(problems) or (
        f"{images} images padded to {expected}, pinned once, rows unchanged by padding"
    )
    return CheckResult("padding and pinned memory", not problems, detail)


def _inputs(pixels: torch.Tensor, tag: str, rows: bool) -> list[ImageInput]:
    return [
        ImageInput(pixels=p, request_id=f"{tag}-{i}", probabilities=rows)
        for i, p in enumerate(pixels)
    ]


async def _predict_together(
    classifier: ModelRunner, batches: Sequence[torch.Tensor], rows: bool
) -> list[list[Prediction | ItemFailed]]:
    """Every batch through ``predict_batch`` at once, as the batcher dispatches them."""
    now = time.monotonic()
    calls = [
        classifier.predict_batch(
            _inputs(batch, str(i), rows),
            BatchInfo(len(batch), "full", now, (0.0,) * len(batch)),
        )
        for i, batch in enumerate(batches)
    ]
    return await asyncio.gather(*calls)


def _probabilities(predictions: Sequence[Prediction | ItemFailed]) -> torch.Tensor:
    """The whole probability vectors the predictions carry, as one (N, classes) tensor."""
    assert all(isinstance(p, Prediction) for p in predictions), "an image failed"
    rows = [p.probabilities for p in predictions if isinstance(p, Prediction)]
    assert all(row is not None for row in rows), "predictions made without their rows"
    return torch.stack(
        [torch.frombuffer(bytearray(row or b""), dtype=torch.float32) for row in rows]
    )


def _record_calls(classifier: ModelRunner) -> list[tuple[str, float, float]]:
    """Wrap ``classifier.forward`` to record (thread, start, end) of every call."""
    calls: list[tuple[str, float, float]] = []
    forward = classifier.forward

    def recorded(pixels: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        started = time.perf_counter()
        result = forward(pixels, threads=threads)
        calls.append((threading.current_thread().name, started, time.perf_counter()))
        return result

    classifier.forward = recorded  # type: ignore[method-assign]
    return calls


def check_concurrent(classifier: ModelRunner, batch_size: int, rounds: int) -> CheckResult:
    """Two batches in flight at once on two model threads, with the same results as one."""
    batches = [fixed_batch(batch_size), fixed_batch(batch_size).flip(0)]
    sequential = [classifier.forward(b) for b in batches]
    calls = _record_calls(classifier)
    try:
        started = time.perf_counter()
        for _ in range(rounds):
            # Timed as /predict asks: its default top_k of 1, no probability rows.
            asyncio.run(_predict_together(classifier, batches, rows=False))
        together_s = time.perf_counter() - started
        # Untimed: with their probability rows, so whole vectors can be compared.
        predicted = asyncio.run(_predict_together(classifier, batches, rows=True))
        together = [_probabilities(predictions) for predictions in predicted]
    finally:
        del classifier.forward  # back to the method
    started = time.perf_counter()
    for _ in range(rounds):
        for batch in batches:
            classifier.forward(batch)
    sequential_s = time.perf_counter() - started
    threads = sorted({name for name, _, _ in calls})
    spans = sorted((start, end) for _, start, end in calls)
    overlapped = any(b_start < a_end for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    worst = max(float((t - s).abs().max()) for t, s in zip(together, sequential, strict=True))
    problems = []
    if len(threads) < 2:
        problems.append(f"forward ran on {threads} only, expected two model threads")
    if not overlapped:
        problems.append("no two forward passes overlapped in time")
    if worst > PROBABILITY_TOLERANCE:
        problems.append(f"concurrent results differ from sequential ones by up to {worst:.4f}")
    images = 2 * rounds * batch_size
    detail = "; ".join(problems) or (
        f"threads {', '.join(threads)} overlapped; batch {batch_size}: "
        f"{images / together_s:.1f} images/s two at a time, "
        f"{images / sequential_s:.1f} images/s one at a time"
    )
    return CheckResult("max_concurrent_batches = 2", not problems, detail)


def device_path(device: torch.device) -> tuple[DevicePreprocessor, Preprocessor]:
    """The server's device preprocessing on ``device``, and its header check (HTTP side)."""
    settings = settings_from_mapping(
        {"model": {"weights": "random", "device": device.type}, "preprocess": {"device": "model"}}
    )
    built = device_preprocessor(
        settings.model,
        device,
        spec=RESNET50,
        preprocess=settings.preprocess,
        limits=settings.limits,
    )
    if built is None:
        raise SystemExit("torchvision's JPEG operators are not available: no device path")
    check = Preprocessor(
        transform=RESNET50.transform("random"),
        max_image_pixels=settings.limits.max_image_pixels,
        keep_jpegs_encoded=True,
    )
    return built, check


def _encoded(check: Preprocessor, files: Sequence[bytes]) -> list[EncodedJpeg]:
    kept = [check.prepare(f) for f in files]
    if not all(isinstance(k, EncodedJpeg) for k in kept):
        raise SystemExit("a sample JPEG was not taken for the device path")
    return [k for k in kept if isinstance(k, EncodedJpeg)]


def check_device_preprocess(classifier: ModelRunner) -> CheckResult:
    """JPEGs decoded and transformed on the device give the CPU path's tensors and top-1."""
    device_pre, check = device_path(classifier.device)
    files = sample_jpegs()
    with classifier.forward_pass.on_stream():
        decoded = device_pre(_encoded(check, files))
    problems = [
        f"image {i} refused: {d}" for i, d in enumerate(decoded) if not isinstance(d, torch.Tensor)
    ]
    if problems:
        return CheckResult("device preprocessing", False, "; ".join(problems))
    got = torch.stack([d.cpu() for d in decoded if isinstance(d, torch.Tensor)])
    cpu = Preprocessor(transform=RESNET50.transform("random"), max_image_pixels=10**9)
    want = torch.stack([cpu(f) for f in files])
    deviation = (got - want).abs()
    mean, worst = float(deviation.mean()), float(deviation.max())
    if mean > DEVICE_MEAN_TOLERANCE or worst > DEVICE_MAX_TOLERANCE:
        problems.append(f"tensor deviation mean {mean:.5f}, max {worst:.4f}")
    top_got = classifier.forward(got).argmax(1).tolist()
    top_want = classifier.forward(want).argmax(1).tolist()
    if top_got != top_want:
        problems.append(f"top-1 {top_got} differs from the CPU path's {top_want}")
    detail = "; ".join(problems) or (
        f"{len(files)} JPEGs on {classifier.device}: tensor deviation mean {mean:.5f}, "
        f"max {worst:.4f} (one 8-bit level = 0.0175); top-1 equal"
    )
    return CheckResult("device preprocessing", not problems, detail)


class UtilisationSampler:
    """Samples the GPU's utilisation (NVML) in a thread while a block runs; mean and max."""

    def __init__(self, device: torch.device, interval_s: float = 0.1) -> None:
        self.device = device
        self.interval_s = interval_s
        self.samples: list[int] = []
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-utilisation", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception as exc:  # no NVML bindings, or no NVML on this machine
                self.unavailable = f"{type(exc).__name__}: {exc}"
                return

    def __enter__(self) -> UtilisationSampler:
        if self.device.type != "cuda":
            self.unavailable = "not a CUDA device"
        else:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Mean and max percent busy, or why there is none."""
        if not self.samples:
            return {"gpu_utilisation": None, "why": self.unavailable or "no sample taken"}
        return {
            "gpu_utilisation_mean_pct": round(statistics.fmean(self.samples), 1),
            "gpu_utilisation_max_pct": max(self.samples),
            "samples": len(self.samples),
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_device_preprocess(
    classifier: ModelRunner, size: tuple[int, int], batch_size: int, seconds: float
) -> dict[str, Any]:
    """Images/s of the device path alone (decode, upright, resize, crop, normalise) on
    batches of ``batch_size`` JPEGs of ``size``, as the model thread runs it."""
    device = classifier.device
    device_pre, check = device_path(device)
    files = sample_jpegs(size)
    batch = _encoded(check, [files[i % len(files)] for i in range(batch_size)])
    times: list[float] = []
    with classifier.forward_pass.on_stream():
        device_pre(batch)  # the decoder's set-up, untimed
        _synchronize(device)
        with UtilisationSampler(device) as sampler:
            deadline = time.perf_counter() + seconds
            while len(times) < 3 or time.perf_counter() < deadline:
                started = time.perf_counter()
                device_pre(batch)
                _synchronize(device)
                times.append(time.perf_counter() - started)
    on_cuda = device.type == "cuda"
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20) if on_cuda else None
    return {
        "jpeg_size": f"{size[0]}x{size[1]}",
        "batch_size": batch_size,
        "images_per_s": round(batch_size * len(times) / sum(times), 1),
        "median_batch_ms": round(statistics.median(times) * 1000, 3),
        "iterations": len(times),
        "peak_memory_mib": peak,
        **sampler.summary(),
    }


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT like 500x375, got {text!r}"
        ) from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return width, height


def _size_list(text: str) -> list[tuple[int, int]]:
    return [_size(part) for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,32, got {text!r}") from None
    if not values or values[0] < 1 or values[-1] > 256:
        raise argparse.ArgumentTypeError(f"expected batch sizes from 1 to 256, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=[1, 2, 4, 8, 16, 32, 64],
        help="allowed batch shapes, and the sizes timed",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per batch size")
    parser.add_argument(
        "--weights",
        default="random",
        help="random (default), a named torchvision weight set, or a state_dict path; real "
        "weights make the top-1 check stronger",
    )
    parser.add_argument("--rounds", type=int, default=10, help="pairs of concurrent batches")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (inductor, freezing) and compile every shape first",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default); cpu runs what applies there, as a sanity check of this script",
    )
    parser.add_argument(
        "--jpeg-sizes",
        type=_size_list,
        default=[(500, 375), (4000, 3000)],
        help="JPEG sizes for the device preprocessing's throughput (default 500x375,4000x3000)",
    )
    parser.add_argument(
        "--preprocess-batch",
        type=int,
        default=64,
        help="JPEGs per device preprocessing call, as in one batch (default 64)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.preprocess_batch < 1:
        parser.error("--preprocess-batch must be at least 1")
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be positive and --rounds at least 1")
    return args


def run_checks(args: argparse.Namespace, classifier: ModelRunner) -> list[CheckResult]:
    """Every check, each on its own so that one failure does not hide the others."""
    sizes = args.batch_sizes
    results = []
    if classifier.device.type == "cuda":
        # The plainest path there is: fp32, NCHW, on the CPU.
        reference = load("cpu", "fp32", sizes, args.weights, channels_last=False)
        try:
            results = [
                check_precision(classifier, "fp16"),
                check_agreement(classifier, reference),
                check_pinned_padding(classifier),
                check_concurrent(classifier, min(8, sizes[-1]), args.rounds),
            ]
        finally:
            reference.close()
    results.append(check_device_preprocess(classifier))
    for result in results:
        print(f"{'PASS' if result.passed else 'FAIL'}  {result.name}: {result.detail}")
    return results


def print_throughput(
    classifier: ModelRunner, sizes: Sequence[int], seconds: float
) -> list[dict[str, Any]]:
    """Images/s and latency by batch size, measured like benchmarks/model_ceiling.py."""
    device = classifier.device
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    name = torch.cuda.get_device_name() if on_cuda else "the CPU"
    mode = "compiled" if classifier.forward_pass.compiled else "eager"
    print(f"\nmodel ceiling on {name} ({classifier.precision} {mode}, one batch at a time)")
    print(f"{'batch':>5} {'images/s':>10} {'median ms':>10} {'p90 ms':>8} {'GPU busy %':>10}")
    rows = []
    for size in sizes:
        with UtilisationSampler(device) as sampler:
            row = measure("fp16-cl", size, seconds, classifier=classifier)
        row.update(sampler.summary())
        rows.append(row)
        latency = f"{row['median_ms']:>10.2f} {row['p90_ms']:>8.2f}"
        busy = row.get("gpu_utilisation_mean_pct", "n/a")
        print(f"{size:>5} {row['images_per_s']:>10.1f} {latency} {busy:>10}")
    if on_cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return rows


def print_device_preprocess(
    classifier: ModelRunner, sizes: Sequence[tuple[int, int]], batch_size: int, seconds: float
) -> list[dict[str, Any]]:
    """Images/s of preprocessing on the model's device, by JPEG size."""
    print(f"\ndevice preprocessing on {classifier.device} (batches of {batch_size} JPEGs)")
    print(f"{'JPEG':>10} {'images/s':>10} {'batch ms':>10} {'GPU busy %':>10} {'peak MiB':>9}")
    rows = []
    for size in sizes:
        if classifier.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = measure_device_preprocess(classifier, size, batch_size, seconds)
        rows.append(row)
        busy = row.get("gpu_utilisation_mean_pct", "n/a")
        peak = row["peak_memory_mib"] if row["peak_memory_mib"] is not None else "n/a"
        print(
            f"{row['jpeg_size']:>10} {row['images_per_s']:>10.1f} "
            f"{row['median_batch_ms']:>10.2f} {busy:>10} {peak:>9}"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(level="WARNING", fmt="text", stream=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"CUDA is not available: torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda or 'none'}) sees no GPU "
            f"(torch.cuda.device_count() = {torch.cuda.device_count()}); "
            "run this on a GPU machine, or pass --device cpu for a sanity check",
            file=sys.stderr,
        )
        return 2
    sizes = args.batch_sizes
    classifier = load(args.device, "auto", sizes, args.weights, concurrent=2, compile=args.compile)
    stance: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    try:
        if args.compile:
            # As the server's warm-up does it: one pass per shape, in a model thread.
            seconds = asyncio.run(classifier.warmup(warmup_sizes(sizes[-1], sizes)))
            print(f"compiled {len(sizes)} batch shapes in {seconds:.1f} s")
            stance = torch.compiler.set_stance("fail_on_recompile")
        with stance:
            results = run_checks(args, classifier)
            ceiling = print_throughput(classifier, sizes, args.seconds)
        preprocess = print_device_preprocess(
            classifier, args.jpeg_sizes, args.preprocess_batch, args.seconds
        )
    finally:
        classifier.close()
    if args.json is not None:
        write_json(
            args.json,
            {
                "device": args.device,
                "mode": "compiled" if args.compile else "eager",
                "checks": [{"name": r.name, "passed": r.passed} for r in results],
                "throughput": [
                    {k: row[k] for k in ("batch_size", "images_per_s", "median_ms", "p90_ms")}
                    | {k: v for k, v in row.items() if k.startswith("gpu_utilisation")}
                    for row in ceiling
                ],
                "device_preprocess": preprocess,
            },
        )
    failed = [r.name for r in results if not r.passed]
    if failed:
        print(f"\n{len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"\nall {len(results)} checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
