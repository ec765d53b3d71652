"""Render docs/performance.md, and README's headline table, from benchmarks/results/*.json.

    python -m benchmarks.report           # rewrite what is stale
    python -m benchmarks.report --check   # exit 1 if docs/performance.md or the headline is stale

Every figure on that page comes from one committed JSON file, next to the command, commit,
date and machine that produced it (its ``provenance``). A benchmark's own JSON, rerun with
the same ``--out``, can replace a file once a ``provenance`` object is added to it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARK_FILES",
    "DOC",
    "HEADLINE_END",
    "HEADLINE_START",
    "README",
    "REJECTED_FILE",
    "REQUIRED_PROVENANCE",
    "RESULTS",
    "Results",
    "headline_block",
    "load_results",
    "main",
    "render_doc",
    "render_headline",
    "replace_headline",
]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"
HEADLINE_START = "<!-- headline:start -->"
HEADLINE_END = "<!-- headline:end -->"

# The page's sections, in order; each file is one run of one command.
BENCHMARK_FILES = (
    "compare.json",
    "load.json",
    "model_ceiling.json",
    "preprocess.json",
    "sweep.json",
    "soak.json",
    "gpu_check.json",
    "gpu_check_compile.json",
    "load_gpu.json",
    "peers.json",
    "workers.json",
    "startup.json",
    "int8.json",
)
REJECTED_FILE = "rejected.json"
REQUIRED_PROVENANCE = ("command", "commit", "date", "machine")

Results = Mapping[str, Mapping[str, Any]]
Json = Mapping[str, Any]

# Escaped: ruff flags the characters themselves as confusable with "-" and "x".
DASH = "\u2013"  # an en dash between a range's ends, as the README writes them
TIMES = "\u00d7"
VARIANT_LABELS = {
    "fp32-nchw": "fp32, NCHW (seed-style)",
    "fp32-cl": "fp32, channels_last",
    "bf16-cl": "bf16 autocast, channels_last",
    "bf16-cl-compile": "bf16, channels_last, `torch.compile`",
    "fp32-cl-compile": "fp32, channels_last, `torch.compile`",
    "fp16-cl": "fp16, channels_last",
    "fp16-cl-compile": "fp16, channels_last, `torch.compile`",
}


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every file the page renders, by file name; a missing file or provenance field raises."""
    results: dict[str, dict[str, Any]] = {}
    for name in (*BENCHMARK_FILES, REJECTED_FILE):
        path = results_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; docs/performance.md is rendered from it")
        data = json.loads(path.read_text(encoding="utf-8"))
        if name != REJECTED_FILE:
            provenance = data.get("provenance") or {}
            missing = [key for key in REQUIRED_PROVENANCE if not provenance.get(key)]
            if missing:
                # A fresh run's JSON lacks these: say what to add rather than render a gap.
                raise ValueError(f"{path}: provenance needs {', '.join(missing)}")
        results[name] = data
    return results


# Formatting: one fixed format per column, so a render is the same on every machine.


def _fmt(value: Any, spec: str) -> str:
    """A number, or a ``[low, high]`` range, in ``spec``; an absent value is an empty cell."""
    if value is None:
        return ""
    if isinstance(value, list):
        low, high = min(value), max(value)
        if low == high:
            return _fmt(low, spec)
        return f"{_fmt(low, spec)}{DASH}{_fmt(high, spec)}"
    if spec == "ms":  # three figures at most, as the README writes times: 3.3, 20.8, 133
        spec = ".0f" if abs(value) >= 100 else ".1f"
    if spec[-1] in "f%":
        return format(float(value), spec)
    return format(int(value) if spec[-1] == "d" else value, spec)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: bool = True) -> str:
    """A markdown table: the first column left-aligned, the others right-aligned if numeric."""
    rule = "---:" if numeric else "---"
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + [rule] * (len(header) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _columns(
    rows: Sequence[Json], columns: Sequence[tuple[str, str, Callable[[Any], str]]]
) -> list[tuple[str, str, Callable[[Any], str]]]:
    """The columns that at least one row has a value for (a README table may give fewer)."""
    return [c for c in columns if any(row.get(c[0]) is not None for row in rows)]


def _provenance(name: str, data: Json) -> str:
    source = data["provenance"]
    role = source.get("commit_role", "")
    line = (
        f"Source: `benchmarks/results/{name}`, from `{source['command']}` at commit "
        f"{source['commit']}{f' ({role})' if role else ''}, {source['date']}, "
        f"on {source['machine']}."
    )
    return f"{line} {source['note']}" if source.get("note") else line


def _section(title: str, intro: str, name: str, data: Json, *body: str) -> str:
    return "\n\n".join([f"## {title}", intro, *body, _provenance(name, data)])


# Sections.

_TARGETS: dict[str, tuple[str, Callable[[float], str], Callable[[float], str]]] = {
    "throughput c=32 vs seed-style": (
        "tuned / seed-style throughput at concurrency 32",
        lambda v: f"{v:.1f}{TIMES}",
        lambda v: f"{v:g}{TIMES}",
    ),
    "throughput c=32 vs pipeline bound": (
        "served throughput / pipeline bound at concurrency 32",
        lambda v: f"{v:.0%}",
        lambda v: f"{v:.0%}",
    ),
    "p50 at c=1 minus its budget (ms)": (
        "p50 at concurrency 1 minus its budget",
        lambda v: f"{v:+.1f} ms",
        lambda v: f"{v:g} ms",
    ),
    "loop lag samples over 10 ms": (
        "event loop lag samples over 10 ms, all tuned rounds",
        lambda v: f"{v:.0f}",
        lambda v: f"{v:g}",
    ),
}
_OPS = {">=": "≥", "<=": "≤"}


def _target_row(target: Json) -> list[str]:
    name = str(target["target"])
    label, measured, goal = _TARGETS.get(name, (name, lambda v: f"{v:g}", lambda v: f"{v:g}"))
    op, _, bound = str(target["goal"]).partition(" ")
    return [
        label,
        f"{_OPS.get(op, op)} {goal(float(bound))}",
        measured(float(target["measured"])),
        "yes" if target["met"] else "no",
    ]


def _all_rounds_ratio(data: Json) -> float | None:
    """Tuned over seed-style images/s at c=32 over all rounds (the script's own JSON has the
    rounds; a README figure is stored as ``throughput_ratio_all_rounds``)."""
    if "seed" in data and "tuned" in data:

        def rate(rounds: Sequence[Json]) -> float:
            return float(sum(r["ok"] for r in rounds) / sum(r["seconds"] for r in rounds))

        return rate(data["tuned"]["c32"]) / rate(data["seed"]["c32"])
    ratio = data.get("throughput_ratio_all_rounds")
    return None if ratio is None else float(ratio)


def _compare(name: str, data: Json) -> str:
    intro = (
        "A seed-style server (batch 1, fp32, NCHW, eager, one pass at a time) and the tuned one "
        f"run at once on 500{TIMES}375 JPEG uploads and take turns in short closed-loop rounds at "
        "concurrency 32 and 1. Around each tuned round, with both idle, the benchmark measures "
        "the pipeline bound (preprocessing plus the model's best per-image time); each target "
        f"counts the median round, since this CPU's speed can change by 2{TIMES} within a minute."
    )
    body = [_table(["target", "goal", "measured", "met"], map(_target_row, data["targets"]))]
    ratio = _all_rounds_ratio(data)
    if ratio is not None:
        body.append(
            f"Over all rounds, tuned / seed-style throughput at concurrency 32: {ratio:.1f}{TIMES}."
        )
    rounds = data.get("rounds") or []
    if rounds:
        columns = _columns(
            rounds,
            [
                ("seed", "seed-style images/s", lambda v: _fmt(v, ".1f")),
                ("throughput", "tuned images/s", lambda v: _fmt(v, ".1f")),
                ("bound", "bound images/s", lambda v: _fmt(v, ".1f")),
                ("p50_ms", "p50 ms", lambda v: _fmt(v, ".1f")),
                ("budget_ms", "p50 budget ms", lambda v: _fmt(v, ".1f")),
                ("server_forward_ms", "server's forward pass ms", lambda v: _fmt(v, ".1f")),
                ("forward_b1_ms", "batch-1 pass alone ms", lambda v: _fmt(v, ".1f")),
                ("lag>10ms", "lag > 10 ms", lambda v: _fmt(v, "d")),
                ("cpu_wait", "loop's CPU wait", lambda v: _fmt(v, ".0%")),
            ],
        )
        body.append("Round by round:")
        body.append(
            _table(
                ["round", *(c[1] for c in columns)],
                (
                    [str(r["round"]).replace("c", "c=", 1), *(c[2](r.get(c[0])) for c in columns)]
                    for r in rounds
                ),
            )
        )
    return _section("Seed-style against tuned: `benchmarks.compare`", intro, name, data, *body)


def _point(result: Json) -> str:
    if "concurrency" in result:
        return f"concurrency {result['concurrency']}"
    return f"{result['rate']:g} arrivals/s"


def _load_table(results: Sequence[Json], ms: str) -> str:
    columns = _columns(
        results,
        [
            ("throughput", "images/s", lambda v: _fmt(v, ".1f")),
            ("p50_ms", "p50 ms", lambda v: _fmt(v, ms)),
            ("p95_ms", "p95 ms", lambda v: _fmt(v, ms)),
            ("p99_ms", "p99 ms", lambda v: _fmt(v, ms)),
            ("mean_batch", "mean batch", lambda v: _fmt(v, ".1f")),
            ("errors", "errors", lambda v: "" if v is None else str(sum(v.values()))),
            ("loop_lag_samples_over_10ms", "loop lag > 10 ms", lambda v: _fmt(v, "d")),
            (
                "loop_lag_less_cpu_wait_samples_over_10ms",
                "less CPU wait",
                lambda v: _fmt(v, "d"),
            ),
            ("loop_cpu_wait_share", "loop's CPU wait", lambda v: _fmt(v, ".0%")),
            ("loop_cpu_ms_per_image", "loop CPU ms/image", lambda v: _fmt(v, ".1f")),
        ],
    )
    return _table(
        ["load", *(c[1] for c in columns)],
        ([_point(r), *(c[2](r.get(c[0])) for c in columns)] for r in results),
    )


def _load(name: str, data: Json) -> str:
    intro = (
        "The tuned server (bf16, channels_last, compiled, batches up to 8, two forward passes "
        "at once) under closed-loop load at each concurrency and under Poisson arrivals at each "
        "rate, over loopback from the same cores. Loop lag counts the server's event loop "
        "samples over 10 ms; *less CPU wait* counts those still over 10 ms once the loop's "
        "wait for a core is taken out."
    )
    table = _load_table(data["results"], ".0f")
    return _section("Load: `benchmarks.load`", intro, name, data, table)


def _model_ceiling(name: str, data: Json) -> str:
    threads = (data.get("machine") or {}).get("threads")
    intro = (
        "Images/s of the model's forward pass alone"
        + (f" ({threads} threads)" if threads else "")
        + ", by variant and batch size, on a fixed batch: the ceiling the server is measured "
        "against (no HTTP, batcher or preprocessing)."
    )
    cells = data["variants"]
    order = [v for v in data.get("settings", {}).get("variants", []) if v in cells]
    order += sorted(set(cells) - set(order))
    sizes = sorted({int(size) for variant in cells.values() for size in variant})
    best = data.get("best") or {}
    rows = []
    for variant in order:
        row = [VARIANT_LABELS.get(variant, variant)]
        for size in sizes:
            cell = cells[variant].get(str(size))
            text = "" if cell is None else _fmt(cell["images_per_s"], ".1f")
            if variant == best.get("variant") and size == best.get("batch_size"):
                text = f"**{text}**"
            row.append(text)
        rows.append(row)
    body = [_table(["variant", *map(str, sizes)], rows)]
    compile_s = [
        cell["compile_s"]
        for variant in cells.values()
        for cell in variant.values()
        if cell.get("compile_s") is not None
    ] or data.get("compile_s_range")
    if compile_s:
        body.append(
            f"`torch.compile` took {_fmt(min(compile_s), '.1f')} to "
            f"{_fmt(max(compile_s), '.1f')} s per batch shape; bold: the best per-image time."
        )
    return _section("The model alone: `benchmarks.model_ceiling`", intro, name, data, *body)


def _case(image: str) -> str:
    """``500x375 q90 astronaut.png`` (one photo of a run) -> ``500x375 q90`` (its case)."""
    return " ".join(image.split()[:2])


def _by_case(rows: Sequence[Json]) -> list[dict[str, Any]]:
    """Rows merged per case, each field the range over its photos (or as stored)."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        case = merged.setdefault(_case(str(row["image"])), {})
        for key, value in row.items():
            if key != "image":
                case.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return [{"image": case, **fields} for case, fields in merged.items()]


def _size(row: Json) -> str:
    if row.get("mbytes") is not None:
        return f"{_fmt(row['mbytes'], '.1f')} MB"
    kbytes = row.get("kbytes")
    if kbytes is None:
        return ""
    if max(kbytes) >= 1000:
        return f"{_fmt([k / 1024 for k in kbytes], '.1f')} MB"
    return f"{_fmt(kbytes, 'd')} KB"


def _label(case: str) -> str:
    size, _, quality = case.partition(" ")
    size = size.replace("x", TIMES)
    return f"{size}, {quality}" if quality else size


def _preprocess(name: str, data: Json) -> str:
    intro = (
        "One image on one core, median ms, over real photos scaled to size with sensor-like "
        "noise. *reference*: torchvision's transform on a full decode; *draft*: `jpeg_draft` "
        "only; *server*: the defaults (`jpeg_draft` and `fast_resize`). Deviation: the "
        "server's tensor against the reference. Ranges span the photos."
    )
    rows = [
        [
            _label(r["image"]),
            _size(r),
            _fmt(r.get("reference_ms"), "ms"),
            _fmt(r.get("draft_ms"), "ms"),
            _fmt(r.get("server_ms"), "ms"),
            _fmt(r.get("mae"), ".4f"),
            _fmt(r.get("max_abs"), ".3f"),
        ]
        for r in _by_case(data["rows"])
    ]
    header = ["JPEG", "size", "reference", "draft", "server", "mean abs. dev.", "max abs. dev."]
    body = [_table(header, rows)]
    stages = _by_case(data.get("stages") or [])
    if stages:
        body.append("Where a small image's time goes, median ms:")
        body.append(
            _table(
                ["JPEG", "decode", "torchvision's transform", "the server's `fast_resize`"],
                (
                    [
                        _label(s["image"]),
                        _fmt(s.get("decode_ms"), "ms"),
                        _fmt(s.get("torchvision_transform_ms"), "ms"),
                        _fmt(s.get("fast_transform_ms"), "ms"),
                    ]
                    for s in stages
                ),
            )
        )
    return _section("Preprocessing: `benchmarks.preprocess`", intro, name, data, *body)


def _sweep(name: str, data: Json) -> str:
    intro = (
        f"The tuned server at concurrency {data['concurrency']}, one fresh server per "
        f"`max_batch_size` {TIMES} `max_wait_ms` point; the sweep recommends the highest "
        "throughput whose p99 stays within its objective, with no errors."
    )
    best = data.get("best") or {}

    def is_best(row: Json) -> bool:
        return bool(best) and all(
            row.get(k) == best.get(k) for k in ("max_batch_size", "max_wait_ms")
        )

    rows = [
        [
            str(r["max_batch_size"]),
            _fmt(r["max_wait_ms"], "g"),
            ("**{}**" if is_best(r) else "{}").format(_fmt(r["throughput"], ".1f")),
            _fmt(r.get("p50_ms"), ".0f"),
            _fmt(r.get("p99_ms"), ".0f"),
            _fmt(r.get("mean_batch"), ".1f"),
        ]
        for r in data["results"]
    ]
    header = ["max_batch_size", "max_wait_ms", "images/s", "p50 ms", "p99 ms", "mean batch"]
    body = [_table(header, rows)]
    if best:
        body.append(
            f"Recommended by this run (bold): `max_batch_size = {best['max_batch_size']}`, "
            f"`max_wait_ms = {float(best['max_wait_ms'])}`."
        )
    return _section("Tuning the batcher: `benchmarks.sweep`", intro, name, data, *body)


def _soak(name: str, data: Json) -> str:
    summary = data["summary"]
    intro = (
        "Steady Poisson arrivals at a fraction of the server's capacity (the slowest of several "
        "closed-loop runs) for minutes: the server's RSS, errors and p99 over time. RSS growth "
        "is the last sample minus the sample at the end of the warm-up."
    )
    errors = sum(int(summary.get(key) or 0) for key in ("4xx", "5xx", "client_errors"))
    calibrations = data.get("calibration_throughputs") or []
    rows = [
        [
            "capacity (slowest calibration run)",
            f"{_fmt(min(calibrations), '.1f')} images/s "
            f"(runs: {', '.join(_fmt(c, '.1f') for c in calibrations)})",
        ]
        if calibrations
        else None,
        [
            "steady load",
            f"{_fmt(data['rate'], '.1f')} requests/s"
            + (f", {data['load_fraction']:.0%} of capacity" if data.get("load_fraction") else "")
            + f", {_fmt(data['duration_s'], 'g')} s, warm-up {_fmt(data['warmup_s'], 'g')} s",
        ],
        [
            "requests",
            f"{summary['sent']:,} sent, {summary['2xx']:,} 2xx, {summary['4xx']:,} 4xx, "
            f"{summary['5xx']:,} 5xx ({errors:,} errors)",
        ],
        [
            "RSS, end of warm-up to end",
            f"{_fmt(summary['rss_warmup_end_mb'], '.1f')} to "
            f"{_fmt(summary['rss_last_mb'], '.1f')} MB: "
            f"**{_fmt(summary['rss_growth_mb'], '+.1f')} MB** "
            f"(slope {_fmt(summary['rss_slope_mb_per_min'], '+.2f')} MB/min)",
        ],
        [
            "p99, first to last windows after warm-up",
            f"{_fmt(summary['p99_first_ms'], '.0f')} to {_fmt(summary['p99_last_ms'], '.0f')} ms",
        ],
    ]
    table = _table(["figure", "value"], (r for r in rows if r is not None), numeric=False)
    return _section("Soak: `benchmarks.soak`", intro, name, data, table)


def _gpu(results: Results) -> str:
    runs = [results["gpu_check.json"], results["gpu_check_compile.json"]]
    intro = (
        "On a GPU: the CUDA code paths' checks (auto precision picks fp16 with channels_last "
        "weights, outputs agree with an fp32 CPU run, batches are padded and pinned, two "
        "forward passes overlap), then the model's images/s by batch size, one batch at a "
        "time. The compiled run checks under dynamo's `fail_on_recompile` stance."
    )
    sizes = sorted({row["batch_size"] for run in runs for row in run["throughput"]})
    rows = []
    for run in runs:
        by_size = {row["batch_size"]: row["images_per_s"] for row in run["throughput"]}
        rows.append(
            [f"images/s, {run['mode']} (fp16, channels_last)"]
            + [_fmt(by_size.get(size), ".1f") for size in sizes]
        )
    body = [_table(["batch", *map(str, sizes)], rows)]
    for run in runs:
        failed = [c["name"] for c in run["checks"] if not c["passed"]]
        verdict = (
            f"all {len(run['checks'])} checks passed"
            if not failed
            else f"failed: {', '.join(failed)}"
        )
        compiled = ""
        if run.get("compile_s") is not None:
            shapes = len(run["throughput"])
            compiled = f"; compiling {shapes} batch shapes took {_fmt(run['compile_s'], '.1f')} s"
        body.append(f"{run['mode'].capitalize()}: {verdict}{compiled}.")
    body += [_provenance(n, results[n]) for n in ("gpu_check.json", "gpu_check_compile.json")]
    return "\n\n".join(["## On a GPU: `benchmarks.gpu_check`", intro, *body])


def _load_gpu(name: str, data: Json) -> str:
    intro = (
        "The whole server on the GPU machine (eager, batches up to 32), closed-loop load over "
        "loopback; the one event loop and the decode threads, not the GPU, are the limit."
    )
    table = _load_table(data["results"], ".1f")
    return _section("Served on a GPU: `benchmarks.load`", intro, name, data, table)


_PEER_LABELS = {
    "ours": "this server, defaults (compiled graphs, from the cache)",
    "ours-eager": "this server, eager (`model.compile = false`)",
    "ours-int8": 'this server, opt-in int8 (`model.precision = "int8"`, compiled)',
    "ours-compiled": "this server, `compile = true`, batches padded to 1/2/4/8",
    "litserve": "LitServe 0.2.19, eager",
    "litserve-compiled": "LitServe 0.2.19, `torch.compile`, batches padded to 1/2/4/8",
    "naive-fastapi": "naive FastAPI (seed design: one image per pass)",
}


def _peers(name: str, data: Json) -> str:
    intro = (
        "This server against its peers with the same model code (seeded random ResNet-50, "
        "torchvision's transform, channels_last, bf16 autocast where the CPU has it), on the "
        f"same 500{TIMES}375 JPEG uploads: every server up at once, each loaded in turn per "
        "round and concurrency in a rotating order while the others are stopped (an idle "
        "LitServe polls its queues). Throughput is over all rounds; latencies are the median "
        "round's."
    )
    rows = [
        [
            _PEER_LABELS.get(str(row["server"]), str(row["server"])),
            str(row["point"]).replace("c", "", 1),
            _fmt(row["throughput"], ".1f"),
            _fmt(row["p50_ms"], ".1f"),
            _fmt(row["p99_ms"], ".1f"),
            _fmt(row["errors"], "d"),
        ]
        for row in data["summary"]
    ]
    table = _table(["server", "concurrency", "images/s", "p50 ms", "p99 ms", "errors"], rows)
    return _section("Against its peers: `benchmarks.peers`", intro, name, data, table)


def _workers(name: str, data: Json) -> str:
    procs = data.get("client_procs", 1)
    intro = (
        "`server.workers` settings side by side: in each round each setting's server is started "
        "alone on the machine, loaded at each concurrency by "
        f"{procs} client process{'es' if procs != 1 else ''} on the same cores, and stopped; "
        "the settings' order rotates from round to round. Throughput is over all rounds; "
        "latencies are the median round's."
    )
    rows = [
        [
            _fmt(row["workers"], "d"),
            str(row["point"]).replace("c", "", 1),
            _fmt(row["throughput"], ".1f"),
            _fmt(row["p50_ms"], ".0f"),
            _fmt(row["p99_ms"], ".0f"),
            _fmt(row["mean_batch"], ".1f"),
            _fmt(row["errors"], "d"),
        ]
        for row in sorted(data["summary"], key=lambda r: (int(r["point"][1:]), r["workers"]))
    ]
    table = _table(
        ["workers", "concurrency", "images/s", "p50 ms", "p99 ms", "mean batch", "errors"], rows
    )
    return _section("Worker processes: `benchmarks.workers`", intro, name, data, table)


def _int8(name: str, data: Json) -> str:
    threads = data["threads"]
    intro = (
        'The opt-in `model.precision = "int8"` against fp32, both as compiled graphs from '
        f"the compile cache, the model alone on {threads} thread{'s' if threads != 1 else ''} "
        f"(no HTTP), in {data['rounds']} alternating rounds: medians of the rounds' images/s. "
        "Agreement counts images whose top class is the same in both, each run alone; the "
        "held-out pictures are scikit-image's that calibration never saw. The weights were "
        "the seeded random ones, which give nearly every picture the same top class, so "
        "agreement here is cheap and says nothing about accuracy; the last column compares "
        "how much fp32's answers differ between pictures with how much int8's differ from "
        "fp32's (higher: int8 keeps more of what tells pictures apart). Measure top-1 "
        "accuracy with the real weights on labelled data before int8 serves."
    )
    rows = [
        [
            _fmt(row["batch_size"], "d"),
            _fmt(row["fp32_images_per_s"], ".1f"),
            _fmt(row["int8_images_per_s"], ".1f"),
            f"{row['speedup']:.2f}{TIMES}",
        ]
        for row in data["rows"]
    ]
    speed = _table(["batch", "fp32 images/s", "int8 images/s", "int8 / fp32"], rows)
    agree = _table(
        [
            "pictures",
            "images",
            "same top-1",
            "top-5 overlap (of 5)",
            "fp32's distinct top-1",
            "between-image signal / int8 error",
        ],
        [
            [
                label,
                _fmt(data["agreement"][key]["images"], "d"),
                _fmt(data["agreement"][key]["top1_agree"], "d"),
                _fmt(data["agreement"][key]["top5_overlap_mean"], ".2f"),
                _fmt(data["agreement"][key].get("fp32_distinct_top1"), "d"),
                f"{data['agreement'][key]['image_signal_to_noise_db']:.1f} dB",
            ]
            for key, label in (("held_out", "held out"), ("calibration", "calibration set"))
        ],
    )
    return _section("INT8 against fp32: `benchmarks.int8`", intro, name, data, speed, agree)


def _startup(name: str, data: Json) -> str:
    intro = (
        "Seconds from spawning `python -m batching_server` (the defaults, ResNet-50) to each of "
        "its log lines: `starting` (Python, torch and the package imported), `model_loaded`, "
        "`listening`, the compile's outcome and `ready`. The first compiled start builds every "
        "shape into an empty cache (`model.compile = true`); the later ones run the default "
        "(`auto`), which loads them. RSS is the process's resident memory once ready: each "
        "compiled graph holds its own copy of the (frozen) weights. Medians over the starts of "
        "each kind."
    )
    rows = [
        [
            str(row["kind"]),
            _fmt(row["starts"], "d"),
            *(_fmt(row.get(phase), ".1f") for phase in _STARTUP_PHASES),
            _fmt(row.get("rss_mb"), ".0f"),
            _fmt(row["graphs_built"], "d"),
            _fmt(row["graphs_loaded"], "d"),
        ]
        for row in data["summary"]
    ]
    header = ["start", "starts", "imported", "model loaded", "listening", "compiled", "ready"]
    table = _table([*header, "RSS MiB", "graphs built", "graphs loaded"], rows)
    return _section("Start-up: `benchmarks.startup`", intro, name, data, table)


_STARTUP_PHASES = ("starting", "model_loaded", "listening", "compiled", "ready")


def _rejected(data: Json) -> str:
    lines = [
        f"- {entry['tried']}: {entry['result']}; see "
        + ("commit " if len(entry["commits"]) == 1 else "commits ")
        + " and ".join(entry["commits"])
        + "."
        for entry in data["rejected"]
    ]
    intro = (
        "Measured on the machines above and not adopted; the commits hold the measurements "
        f"(`benchmarks/results/{REJECTED_FILE}`)."
    )
    return "\n\n".join(["## Tried and not adopted", intro, "\n".join(lines)])


_HEADER = f"""# Performance

<!-- Rendered by `python -m benchmarks.report` from benchmarks/results/*.json: edit those. -->

Current figures only. Each table comes from one committed JSON file under `benchmarks/results/`
and is followed by the command, commit, date and machine that produced it; history is in git
and [CHANGELOG.md](../CHANGELOG.md). The 2-vCPU development machine's speed drifts by ±20%
between runs (up to 2{TIMES} within a minute), so compare figures within one table, not across
tables. Rerun a benchmark, add a `provenance` object to its JSON, then
`python -m benchmarks.report` (`make perf-doc`)."""


def render_doc(results: Results) -> str:
    """docs/performance.md, from the loaded results."""
    sections = [
        _HEADER,
        _compare("compare.json", results["compare.json"]),
        _load("load.json", results["load.json"]),
        _model_ceiling("model_ceiling.json", results["model_ceiling.json"]),
        _preprocess("preprocess.json", results["preprocess.json"]),
        _sweep("sweep.json", results["sweep.json"]),
        _soak("soak.json", results["soak.json"]),
        _gpu(results),
        _load_gpu("load_gpu.json", results["load_gpu.json"]),
        _peers("peers.json", results["peers.json"]),
        _workers("workers.json", results["workers.json"]),
        _startup("startup.json", results["startup.json"]),
        _int8("int8.json", results["int8.json"]),
        _rejected(results[REJECTED_FILE]),
    ]
    return "\n\n".join(sections) + "\n"


def _machine_tag(data: Json) -> str:
    """A few words naming the machine of one result, so figures from different ones show it."""
    machine = str(data["provenance"]["machine"])
    for needle, tag in (("EPYC", "AMD EPYC"), ("Xeon", "Xeon"), ("H100", "H100"), ("H200", "H200")):
        if needle in machine:
            return tag
    return machine.split(",")[0]


def render_headline(results: Results) -> str:
    """README's headline table (a few current figures) and a link to the full page."""
    targets = {t["target"]: t for t in results["compare.json"]["targets"]}
    ratio = targets["throughput c=32 vs seed-style"]["measured"]
    bound = targets["throughput c=32 vs pipeline bound"]["measured"]
    peers = {(r["server"], r["point"]): r["throughput"] for r in results["peers.json"]["summary"]}
    p50 = {(r["server"], r["point"]): r["p50_ms"] for r in results["peers.json"]["summary"]}
    c1 = next(r for r in results["load.json"]["results"] if r.get("concurrency") == 1)
    best = results["model_ceiling.json"]["best"]
    soak = results["soak.json"]["summary"]
    errors = sum(int(soak.get(key) or 0) for key in ("4xx", "5xx", "client_errors"))
    gpu_model = max(
        results["gpu_check_compile.json"]["throughput"], key=lambda r: r["images_per_s"]
    )
    gpu_served = max(results["load_gpu.json"]["results"], key=lambda r: r["throughput"])
    rows = [
        [
            "tuned / seed-style throughput at concurrency 32 "
            f"({_machine_tag(results['compare.json'])})",
            f"{ratio:.1f}{TIMES}",
        ],
        [
            "served throughput / pipeline bound at concurrency 32 "
            f"({_machine_tag(results['compare.json'])})",
            f"{bound:.0%}",
        ],
        [
            "this server (defaults) / LitServe (`torch.compile`) throughput at concurrency 32 "
            f"({_machine_tag(results['peers.json'])})",
            f"{peers[('ours', 'c32')] / peers[('litserve-compiled', 'c32')]:.2f}{TIMES}",
        ],
        [
            "this server (defaults) / LitServe (`torch.compile`) p50 at concurrency 1 "
            f"({_machine_tag(results['peers.json'])})",
            f"{p50[('ours', 'c1')] / p50[('litserve-compiled', 'c1')]:.2f}{TIMES}",
        ],
        *(
            [
                [
                    "this server (opt-in int8) / LitServe (`torch.compile`) throughput at "
                    f"concurrency 32 ({_machine_tag(results['peers.json'])})",
                    f"{peers[('ours-int8', 'c32')] / peers[('litserve-compiled', 'c32')]:.2f}"
                    f"{TIMES}",
                ]
            ]
            if ("ours-int8", "c32") in peers
            else []
        ),
        [
            f"p50 latency at concurrency 1 (tuned, {_machine_tag(results['load.json'])})",
            f"{c1['p50_ms']:.0f} ms",
        ],
        [
            f"model alone, best ({_machine_tag(results['model_ceiling.json'])}, "
            f"{VARIANT_LABELS.get(best['variant'], best['variant'])}, "
            f"batch {best['batch_size']})",
            f"{best['images_per_s']:.1f} images/s",
        ],
        [
            f"soak, {results['soak.json']['duration_s']:g} s of steady load "
            f"({_machine_tag(results['soak.json'])})",
            f"{soak['sent']:,} requests, {errors:,} errors, RSS {soak['rss_growth_mb']:+.1f} MB",
        ],
        [
            f"model alone ({_machine_tag(results['gpu_check_compile.json'])}, compiled, "
            f"batch {gpu_model['batch_size']})",
            f"{gpu_model['images_per_s']:.1f} images/s",
        ],
        [
            f"served ({_machine_tag(results['load_gpu.json'])}, eager, {_point(gpu_served)})",
            f"{gpu_served['throughput']:.1f} images/s",
        ],
    ]
    return (
        _table(["figure", "measured"], rows)
        + "\n\nEvery figure with its command, commit, date and machine: "
        "[docs/performance.md](docs/performance.md).\n"
    )


def _marker_span(text: str) -> tuple[int, int] | None:
    """Where the text between the markers starts and ends, or None without both markers."""
    start = text.find(HEADLINE_START)
    if start < 0:
        return None
    begin = start + len(HEADLINE_START)
    end = text.find(HEADLINE_END, begin)
    return None if end < 0 else (begin, end)


def headline_block(readme: str) -> str | None:
    """The text between README's headline markers, or None when they are absent."""
    span = _marker_span(readme)
    return None if span is None else readme[span[0] : span[1]]


def replace_headline(readme: str, headline: str) -> str | None:
    """``readme`` with only the text between its markers replaced; None without markers."""
    span = _marker_span(readme)
    if span is None:
        return None
    return readme[: span[0]] + "\n" + headline + readme[span[1] :]


def _diff(path: Path, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(), new.splitlines(), str(path), "rendered", lineterm="", n=1
    )
    return "\n".join(list(lines)[:40])


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/performance.md and README's headline block, or with --check report them."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if anything is stale")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON files' folder")
    parser.add_argument("--doc", type=Path, default=DOC, help="the page to render")
    parser.add_argument("--readme", type=Path, default=README, help="holds the headline markers")
    args = parser.parse_args(argv)

    results = load_results(args.results)
    wanted = {args.doc: render_doc(results)}
    readme = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else ""
    new_readme = replace_headline(readme, render_headline(results))
    if new_readme is None:
        # Someone else owns the rest of the README: without markers it is left alone.
        print(f"{args.readme}: no headline markers; left untouched", file=sys.stderr)
    else:
        wanted[args.readme] = new_readme

    stale = {}
    for path, text in wanted.items():
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            stale[path] = current
    if args.check:
        for path, current in stale.items():
            print(f"{path} is stale: run python -m benchmarks.report", file=sys.stderr)
            print(_diff(path, current, wanted[path]), file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path], encoding="utf-8", newline="\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
