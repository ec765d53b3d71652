"""Offline ResNet-50 forward passes by batch size: the ceiling the server is measured against.

Every variant is built by the package's own ``load_runner`` and timed through
``ModelRunner.forward``, so padding, autocast, channels_last and torch.compile are exactly what
the server runs. No HTTP, no batcher, no preprocessing: just the model.

    .venv/bin/python benchmarks/model_ceiling.py --seconds 3 --batch-sizes 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batching_server.models import RESNET50, ModelRunner, compile_runner, load_runner
from batching_server.models.acceleration import cpu_flags, cpu_model
from batching_server.models.threads import available_cores
from batching_server.observability.logs import configure_logging
from batching_server.settings import settings_from_mapping

__all__ = ["VARIANTS", "Variant", "build_classifier", "main", "measure"]

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_ITERATIONS = 1  # after the first call (which compiles, for compile variants)
MIN_ITERATIONS = 3
INPUT_SEED = 1234
# Other processes' CPU, in cores, above which a measurement is flagged as not trustworthy.
BUSY_NEIGHBOUR_CORES = 0.25


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of running the model: the ModelSettings keys that differ between variants."""

    name: str
    precision: str
    channels_last: bool
    compile: bool


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fp32-nchw", "fp32", channels_last=False, compile=False),
        Variant("fp32-cl", "fp32", channels_last=True, compile=False),
        Variant("bf16-cl", "bf16", channels_last=True, compile=False),
        Variant("bf16-cl-compile", "bf16", channels_last=True, compile=True),
        Variant("fp32-cl-compile", "fp32", channels_last=True, compile=True),
        Variant("fp16-cl", "fp16", channels_last=True, compile=False),
        Variant("fp16-cl-compile", "fp16", channels_last=True, compile=True),
        Variant("int8-cl-compile", "int8", channels_last=True, compile=True),
    )
}
CPU_DEFAULT = ("fp32-nchw", "fp32-cl", "bf16-cl", "bf16-cl-compile", "fp32-cl-compile")
CUDA_DEFAULT = (*CPU_DEFAULT, "fp16-cl", "fp16-cl-compile")


def resolve_device_name(requested: str) -> str:
    """``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def unavailable_reason(variant: Variant, device: str) -> str | None:
    """Why ``variant`` would not run natively on ``device``; None when it would."""
    if device == "cuda":
        if variant.precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "this GPU has no native bf16"
        return None
    if variant.precision == "int8" and device != "cpu":
        return "int8 runs on x86 CPUs only"
    if variant.precision == "fp16":
        return "fp16 on CPU is emulated (fp16 variants are for CUDA)"
    if variant.precision == "bf16" and not {"amx_bf16", "avx512_bf16"} & cpu_flags():
        return "this CPU has neither AMX nor AVX512-BF16, so bf16 would be emulated"
    return None


def build_classifier(
    variant: str, batch_sizes: Sequence[int], *, device: str = "cpu", threads: int | None = None
) -> ModelRunner:
    """The classifier the server would load for ``variant``, allowing exactly ``batch_sizes``."""
    spec = VARIANTS[variant]
    sizes = sorted(set(batch_sizes))
    settings = settings_from_mapping(
        {
            "model": {
                "weights": "random",
                "device": device,
                "warmup": False,
                # One pass in flight on exactly these threads: the model alone.
                "num_threads": threads or available_cores(),
                "precision": spec.precision,
                "channels_last": spec.channels_last,
                "compile": spec.compile,
            },
            # Allowed shapes = measured sizes, so no batch is padded and the recompile
            # limit is sized for every shape measured.
            "batching": {
                "max_batch_size": sizes[-1],
                "batch_sizes": sizes,
                "max_queue_size": max(64, sizes[-1]),
                "max_concurrent_batches": 1,
            },
        }
    )
    runner = load_runner(settings.model, batching=settings.batching)
    if spec.compile:
        # As a server start does: from the compile cache, built into it the first time.
        compile_runner(runner, settings.model, batching=settings.batching)
    return runner


def fixed_batch(batch_size: int, seed: int = INPUT_SEED) -> torch.Tensor:
    """The same random (N, 3, 224, 224) batch on every run, like normalised pixels."""
    generator = torch.Generator().manual_seed(seed + batch_size)
    size = RESNET50.input_size("random")
    return torch.randn(batch_size, 3, size, size, generator=generator)


def _timed_call(classifier: ModelRunner, batch: torch.Tensor) -> float:
    started = time.perf_counter()
    classifier.forward(batch)  # returns on the CPU, so CUDA work is finished too
    return time.perf_counter() - started


def _system_busy_s() -> float | None:
    """CPU seconds every process has used since boot, steal included (None off Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores kept busy by anything but this process while a block runs.

    On a 2-core machine one busy neighbour makes every OpenMP barrier wait for a time
    slice, so a number measured beside other work is wrong by far more than its share.
    """

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._start = (time.perf_counter(), time.process_time(), _system_busy_s())
        return self

    def __exit__(self, *_: object) -> None:
        wall0, own0, busy0 = self._start
        busy = _system_busy_s()
        wall = time.perf_counter() - wall0
        if busy is None or busy0 is None or wall <= 0:
            return
        other = (busy - busy0) - (time.process_time() - own0)
        self.cores = max(0.0, other / wall)


def _p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def measure(
    variant: str,
    batch_size: int,
    seconds: float,
    *,
    device: str = "cpu",
    threads: int | None = None,
    classifier: ModelRunner | None = None,
) -> dict[str, Any]:
    """Time ``classifier.forward`` on one fixed batch for about ``seconds``; one result row.

    Builds (and closes) a classifier for ``variant`` unless one is passed. The first call is
    timed on its own: for compile variants it is the compile of this batch shape.
    """
    spec = VARIANTS[variant]
    device = classifier.device.type if classifier is not None else resolve_device_name(device)
    threads = threads or available_cores()
    # forward() runs in this thread, and the OpenMP pool size is per calling thread.
    torch.set_num_threads(threads)
    owned = classifier is None
    if classifier is None:
        if spec.compile:
            torch._dynamo.reset()  # graphs of earlier calls must not count toward the limit
        classifier = build_classifier(variant, [batch_size], device=device, threads=threads)
    try:
        batch = fixed_batch(batch_size)
        first_s = _timed_call(classifier, batch)
        for _ in range(WARMUP_ITERATIONS):
            _timed_call(classifier, batch)
        latencies: list[float] = []
        with OtherLoad() as other:
            deadline = time.perf_counter() + seconds
            while len(latencies) < MIN_ITERATIONS or time.perf_counter() < deadline:
                latencies.append(_timed_call(classifier, batch))
    finally:
        if owned:
            classifier.close()
    total = sum(latencies)
    return {
        "variant": variant,
        "batch_size": batch_size,
        "device": device,
        "threads": threads,
        "precision": classifier.precision,
        "channels_last": classifier.forward_pass.channels_last,
        "compile": classifier.forward_pass.compiled,
        "iterations": len(latencies),
        "measured_s": round(total, 4),
        "images_per_s": round(batch_size * len(latencies) / total, 2),
        "median_ms": round(statistics.median(latencies) * 1000, 3),
        "p90_ms": round(_p90(latencies) * 1000, 3),
        "mean_ms": round(total / len(latencies) * 1000, 3),
        # Throughput-based, so it is the bound on a pipeline that keeps the model busy.
        "per_image_ms": round(total / (len(latencies) * batch_size) * 1000, 3),
        "first_call_s": round(first_s, 3),
        "compile_s": round(first_s, 3) if spec.compile else None,
        # Cores' worth of CPU other processes used meanwhile; well above 0 taints the row.
        "other_load_cores": None if other.cores is None else round(other.cores, 2),
    }


def _release(classifier: ModelRunner, compiled: bool) -> None:
    classifier.close()
    if compiled:
        # Each variant starts from no compiled graphs, as a fresh server process would.
        torch._dynamo.reset()
    gc.collect()


def run_variant(
    variant: str, batch_sizes: Sequence[int], seconds: float, *, device: str, threads: int
) -> list[dict[str, Any]]:
    """Measure one variant at every batch size, reusing one loaded classifier."""
    classifier = build_classifier(variant, batch_sizes, device=device, threads=threads)
    rows = []
    try:
        for size in batch_sizes:
            row = measure(
                variant, size, seconds, device=device, threads=threads, classifier=classifier
            )
            rows.append(row)
            _progress(row)
    finally:
        _release(classifier, VARIANTS[variant].compile)
    return rows


def disturbed(row: dict[str, Any]) -> bool:
    """Whether other processes used enough CPU during the row's measurement to skew it."""
    return (row["other_load_cores"] or 0.0) >= BUSY_NEIGHBOUR_CORES


def _progress(row: dict[str, Any]) -> None:
    notes = [f"{row['iterations']} iterations"]
    if row["compile_s"] is not None:
        notes.append(f"compile {row['compile_s']:.1f} s")
    if disturbed(row):
        notes.append(f"DISTURBED: other processes used {row['other_load_cores']:.2f} cores")
    print(
        f"  {row['variant']:<16} batch {row['batch_size']:>3}: {row['images_per_s']:8.1f} img/s, "
        f"median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms ({', '.join(notes)})",
        file=sys.stderr,
        flush=True,
    )


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The (variant, batch size) with the lowest per-image time."""
    best = min(rows, key=lambda r: r["per_image_ms"])
    return {
        "variant": best["variant"],
        "batch_size": best["batch_size"],
        "per_image_ms": best["per_image_ms"],
        "images_per_s": best["images_per_s"],
        "disturbed": disturbed(best),
    }


def by_variant(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{variant: {batch_size: {per_image_ms, images_per_s, ...}}}`` for easy lookups."""
    keys = ("per_image_ms", "images_per_s", "median_ms", "p90_ms", "compile_s", "other_load_cores")
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        table.setdefault(row["variant"], {})[str(row["batch_size"])] = {k: row[k] for k in keys}
    return table


def _grid(
    rows: Sequence[dict[str, Any]],
    batch_sizes: Sequence[int],
    key: str,
    width: int,
    *,
    mark: bool = True,
) -> list[str]:
    """One line per variant of ``key`` by batch size; ``*`` marks a disturbed measurement."""
    cells = {(r["variant"], r["batch_size"]): r for r in rows if r[key] is not None}
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in rows if r[key] is not None):
        line = f"{variant:<{width}}"
        for size in batch_sizes:
            row = cells.get((variant, size))
            if row is None:
                line += f"{'- ':>11}"
            else:
                flag = "*" if mark and disturbed(row) else " "
                line += f"{row[key]:>10.1f}{flag}"
        lines.append(line)
    return lines


def format_table(rows: Sequence[dict[str, Any]], batch_sizes: Sequence[int]) -> str:
    """Images/s with one row per variant and one column per batch size, then the best."""
    width = max([len("variant"), *(len(r["variant"]) for r in rows)])
    header = f"{'variant':<{width}}" + "".join(f"{f'bs={s} ':>11}" for s in batch_sizes)
    lines = ["images/s by batch size", header, "-" * len(header)]
    lines += _grid(rows, batch_sizes, "images_per_s", width)
    if any(r["compile_s"] is not None for r in rows):
        lines += ["", "compile seconds (first call per batch size)"]
        lines += _grid(rows, batch_sizes, "compile_s", width, mark=False)
    if any(disturbed(r) for r in rows):
        lines += [
            "",
            f"* other processes used >= {BUSY_NEIGHBOUR_CORES} cores meanwhile: "
            "rerun on a quiet machine",
        ]
    best = best_row(rows)
    lines += [
        "",
        f"best: {best['variant']} at batch {best['batch_size']}: "
        f"{best['per_image_ms']:.2f} ms per image ({best['images_per_s']:.1f} images/s)",
    ]
    return "\n".join(lines)


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """What the numbers depend on, recorded next to them."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model() or "unknown",
        "cores": available_cores(),
        "threads": threads,
        "cpu_bf16_flags": sorted({"amx_bf16", "avx512_bf16"} & cpu_flags()),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def write_plot(path: Path, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Images/s against batch size, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, cells in by_variant(rows).items():
        sizes = sorted(int(s) for s in cells)
        ax.plot(sizes, [cells[str(s)]["images_per_s"] for s in sizes], marker="o", label=variant)
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4,8, got {text!r}") from None
    if not values or values[0] < 1 or values[-1] > 256:
        raise argparse.ArgumentTypeError(f"expected batch sizes from 1 to 256, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown) or text!r}; known: {', '.join(VARIANTS)}"
        )
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--variants",
        type=_name_list,
        default=None,
        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all the device runs natively)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_ceiling.json")
    parser.add_argument(
        "--plot", default=str(RESULTS / "model_ceiling.png"), help="PNG path; '' for no plot"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.threads < 0:
        parser.error("--seconds must be positive and --threads not negative")
    return args


def choose_variants(
    requested: Sequence[str] | None, device: str
) -> tuple[list[str], list[dict[str, str]]]:
    """The variants to run, and the skipped ones with why."""
    names = requested or (CUDA_DEFAULT if device == "cuda" else CPU_DEFAULT)
    chosen: list[str] = []
    skipped: list[dict[str, str]] = []
    for name in names:
        reason = unavailable_reason(VARIANTS[name], device)
        if reason is None:
            chosen.append(name)
        else:
            skipped.append({"variant": name, "reason": reason})
    return chosen, skipped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The package logs model loads to stdout; the table owns stdout here.
    configure_logging(level="WARNING", fmt="text", stream=sys.stderr)
    device = resolve_device_name(args.device)
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available to torch; use --device cpu or auto", file=sys.stderr)
        return 2
    threads = args.threads or available_cores()
    variants, skipped = choose_variants(args.variants, device)
    for skip in skipped:
        print(f"note: skipping {skip['variant']}: {skip['reason']}", file=sys.stderr)
    if not variants:
        print("no variant left to run", file=sys.stderr)
        return 2
    print(
        f"model ceiling: {', '.join(variants)} at batch sizes {args.batch_sizes}, "
        f"{args.seconds:g} s each, {threads} threads on {device}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for variant in variants:
        rows += run_variant(variant, args.batch_sizes, args.seconds, device=device, threads=threads)
    machine = machine_info(device, threads)
    report = {
        "benchmark": "model_ceiling",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "settings": {
            "batch_sizes": args.batch_sizes,
            "variants": variants,
            "seconds": args.seconds,
            "warmup_iterations": WARMUP_ITERATIONS,
            "min_iterations": MIN_ITERATIONS,
            "input_seed": INPUT_SEED,
        },
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
        "variants": by_variant(rows),
        "best": best_row(rows),
    }
    print(format_table(rows, args.batch_sizes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        title = (
            f"ResNet-50 forward, {machine['cpu_model'] if device == 'cpu' else machine['gpu']}, "
            f"{threads} threads, torch {torch.__version__}"
        )
        write_plot(Path(args.plot), rows, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
