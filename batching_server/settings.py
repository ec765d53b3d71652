"""Settings: load ``settings.toml`` and ``BATCHING_SERVER_*`` variables, validate, freeze.

Every key has a default here, so the server runs with no file at all. Validation collects
every problem before it fails, so an operator fixes a bad config in one pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynaconf import Dynaconf

__all__ = [
    "CROSS_KEY_RULES",
    "ENV_PREFIX",
    "AuthSettings",
    "BatchingSettings",
    "CrossKeyRule",
    "LimitsSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ModelSettings",
    "OipSettings",
    "PreprocessSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "TracingSettings",
    "check_model_catalogue",
    "load_settings",
    "settings_from_mapping",
    "settings_warnings",
    "without_model_catalogue",
]

ENV_PREFIX = "BATCHING_SERVER"


@dataclass(frozen=True, slots=True)
class Check:
    """A setting's validator, with what it accepts in words (for errors and the docs)."""

    allowed: str
    convert: Callable[[Any], Any]

    def __call__(self, value: Any) -> Any:
        """Return the typed value, or raise ValueError with the expectation in words."""
        return self.convert(value)


class SettingsError(Exception):
    """One or more settings are invalid; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid settings ({len(problems)} {noun}):\n{lines}")


# Each check takes the raw value and returns the typed one, or raises ValueError with the
# expectation in words; the caller prefixes the key and appends the bad value. Where it can,
# the error text is the ``allowed`` text, so the message and the docs cannot drift apart.


def _integer(low: int, high: int) -> Check:
    allowed = f"an integer from {low} to {high}"

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(allowed)
        return value

    return Check(allowed, check)


def _number(low: float, high: float) -> Check:
    allowed = f"a number from {low:g} to {high:g}"

    def check(value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ValueError(allowed)
        return float(value)

    return Check(allowed, check)


def _check_boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(_boolean.allowed)
    return value


_boolean = Check("true or false", _check_boolean)


def _choice(*choices: str, case_insensitive: bool = False) -> Check:
    allowed = "one of " + ", ".join(repr(c) for c in choices)
    if case_insensitive:
        allowed += " (any case)"

    def check(value: Any) -> str:
        if isinstance(value, str):
            wanted = value.upper() if case_insensitive else value
            for choice in choices:
                if wanted == (choice.upper() if case_insensitive else choice):
                    return choice
        raise ValueError("one of " + ", ".join(repr(c) for c in choices))

    return Check(allowed, check)


_HOST = "a host name or IP address without spaces, such as '127.0.0.1'"


def _check_host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ValueError(_HOST)
    return value


_host = Check(_HOST, _check_host)

_COMPILE = "'auto', 'true' or 'false' (or a boolean)"


def _check_compile(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return value.lower()
    raise ValueError(_COMPILE)


_compile_choice = Check(_COMPILE, _check_compile)

_CACHE_DIR = "'default', '' (no cache) or the path of a folder"


def _check_cache_dir(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(_CACHE_DIR)
    if value in ("", "default"):
        return value
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{_CACHE_DIR} (it is a file)")
    return str(path)


_cache_dir = Check(_CACHE_DIR, _check_cache_dir)
# Empty stands for server.host; a bad value is still reported in _host's words.
_host_or_empty = Check(
    f"empty, or {_HOST}", lambda value: "" if value == "" else _check_host(value)
)

_MODEL_NAME = "the name of a torchvision classification model, such as resnet50 or convnext_tiny"


# Whether model.name (and named model.weights) are looked up in torchvision's catalogue
# while the settings load. The supervisor of worker processes loads them without it
# (torchvision would cost it seconds and hundreds of megabytes for one check); each worker
# then checks them in full.
_CATALOGUE_CHECK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "catalogue_check", default=True
)
_MODEL_NAME_SHAPE = re.compile(r"[a-z][a-z0-9_]*")


def _check_model_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(_MODEL_NAME)
    if not _CATALOGUE_CHECK.get():
        if not _MODEL_NAME_SHAPE.fullmatch(value):
            raise ValueError(_MODEL_NAME)
        return value
    # Imported here: only this check needs torchvision's catalogue, and settings.py sits
    # below the model layer.
    from .models.torchvision_spec import classification_models, model_choices

    if value not in classification_models():
        raise ValueError(f"{_MODEL_NAME} ({model_choices(value)})")
    return value


@contextlib.contextmanager
def without_model_catalogue() -> Iterator[None]:
    """Settings validated inside skip the checks against torchvision's catalogue (model.name
    is checked for its shape only); ``check_model_catalogue`` runs them later."""
    token = _CATALOGUE_CHECK.set(False)
    try:
        yield
    finally:
        _CATALOGUE_CHECK.reset(token)


def check_model_catalogue(settings: Settings) -> None:
    """The checks against torchvision's catalogue (model.name, and model.weights' names)
    that settings validated ``without_model_catalogue()`` left out."""
    try:
        _check_model_name(settings.model.name)
    except ValueError as exc:
        raise SettingsError([f"model.name must be {exc}, got {settings.model.name!r}"]) from exc
    problem = _weights_fit_the_model(settings)
    if problem is not None:
        raise SettingsError([problem])


_model_name = Check(_MODEL_NAME, _check_model_name)

_WEIGHTS = (
    "'DEFAULT' or another of the model's named weights (any case), 'random', or the path of an "
    "existing state_dict file"
)
_WEIGHTS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _check_weights(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(_WEIGHTS)
    if value == "random":
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return str(path)
    if _WEIGHTS_NAME.fullmatch(value):
        # Which names the model has is a rule between model.name and model.weights.
        return value.upper()
    raise ValueError(f"{_WEIGHTS} (no such file)")


_weights = Check(_WEIGHTS, _check_weights)

_PATHS = 'a list of URL paths, such as ["/metrics", "/health"]'


def _check_paths(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(p, str) and p.startswith("/") for p in value
    ):
        raise ValueError(_PATHS)
    return tuple(value)


_paths = Check(_PATHS, _check_paths)

_BATCH_SIZES = "a strictly increasing list of integers from 1 to 256, such as [1, 4, 8]"


def _check_batch_sizes(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list | tuple)
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256 for v in value)
        or list(value) != sorted(set(value))
    ):
        raise ValueError(_BATCH_SIZES)
    return tuple(value)


_batch_sizes = Check(_BATCH_SIZES, _check_batch_sizes)

_API_KEYS = "a list of API keys, each at least 16 printable characters, no spaces"


def _check_api_keys(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(k, str) and len(k) >= 16 and k.isprintable() and " " not in k for k in value
    ):
        raise ValueError(_API_KEYS)
    return tuple(value)


_api_keys = Check(_API_KEYS, _check_api_keys)
_ratio = _number(0.0, 1.0)


def _check_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(_text.allowed)
    return value


_text = Check("a string", _check_text)


def _setting(default: Any, check: Check, doc: str, details: str = "") -> Any:
    """A field whose metadata carries its check, its one-line doc and its longer details.

    ``details`` says why, the trade-off and the interactions with other keys; blank lines
    separate its paragraphs, other line breaks are only source layout.
    """
    return field(
        default=default,
        metadata={"check": check, "doc": doc, "details": details, "allowed": check.allowed},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """Where the HTTP server listens and how long it may take to drain."""

    host: str = _setting(
        "127.0.0.1",
        _host,
        "Interface to bind",
        """`127.0.0.1` keeps the server local; use `0.0.0.0` in a container. The command line's
        `--host` overrides it.""",
    )
    port: int = _setting(
        8080,
        _integer(0, 65535),
        "TCP port (0 picks a free one, which is logged)",
        "The command line's `--port` overrides it.",
    )
    graceful_shutdown_timeout_s: float = _setting(
        30.0,
        _number(0, 3600),
        "Seconds to finish accepted requests after SIGTERM or SIGINT",
        """First `/ready` turns 503 and the listening socket closes; accepted requests then have
        this long to finish and queued images to be served, and the process exits 0. Images still
        queued or in a forward pass when it runs out fail with 503 `shutting_down`, and the
        process exits 6. A forward pass that hangs during the drain is a stall
        (`model.stall_timeout_s`, exit 4). A second SIGTERM or SIGINT stops the process at once:
        callers waiting for the model get 503 `shutting_down`, and the exit status is 128 + the
        signal's number (143 or 130).

        Keep it at least `batching.request_timeout_s`, and below the time your orchestrator waits
        before it sends SIGKILL (Kubernetes: `terminationGracePeriodSeconds`, less any `preStop`
        sleep).""",
    )
    keepalive_timeout_s: float = _setting(
        75.0,
        _number(1, 3600),
        "Seconds an idle connection stays open, and the longest a client may take to send a "
        "request's headers",
        """Keep it above the idle timeout of the load balancer or proxy in front (60 s on many, such
        as AWS's ALB and nginx's `keepalive_timeout` for upstreams; check yours): the side that
        closes an idle connection first can race a request the other side is sending on it, which
        the client sees as a 502. 75 s is what aiohttp's own `run_app` uses; a hand-built runner
        would keep connections for about an hour.

        aiohttp has no separate timeout for reading headers: this one runs from the connection's
        start (or the previous response) until a request's headers have arrived, and sending
        bytes does not extend it, so it also closes a client that sends its headers too slowly. It
        does not bound the body: once the headers are in, the request belongs to its handler.""",
    )
    workers: int = _setting(
        1,
        _integer(0, 256),
        "Worker processes, each a whole server on the same port (0: one per GPU, else 1)",
        """`1` runs today's single process, with no supervisor. Above 1, a supervisor process binds
        the port once and starts that many workers, each with the model, its batcher and its
        decode threads on a disjoint share of the cores (and, with several GPUs, a GPU of its own,
        round-robin); one process's event loop and GIL then no longer bound the whole server. The
        supervisor replaces a worker that dies, stops the server when a worker keeps failing at
        start-up, forwards SIGTERM and SIGINT, and `/metrics` sums the workers. `0` picks one
        worker per GPU on a GPU machine and 1 on a CPU-only one, where the cores are better spent
        on one process's decode and model threads (see docs/operations.md). It may not exceed the
        cores the server is allowed to use.""",
    )
    low_priority_workers: bool = _setting(
        True,
        _boolean,
        "Decode and model threads run below the event loop's priority (nice +10 and +19, Linux)",
        """This way, on a saturated machine the event loop still gets a core as soon as a request or
        a result is ready, rather than waiting behind a decode or a forward pass. The model threads
        and their OpenMP workers go lowest: a batch that waits a little still serves all its images
        while a late loop delays every request, and a decode thread holding the GIL never waits for
        a core behind a forward pass. A nice value is a weight, not `SCHED_IDLE`: an overloaded
        machine still gives the forward passes their share. Other platforms than Linux ignore
        it.""",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchingSettings:
    """How the dynamic batcher groups images into forward passes."""

    max_batch_size: int = _setting(
        8,
        _integer(1, 256),
        "Images in one forward pass at most",
        """With `model.warmup`, every batch shape a request can reach runs once before the server
        reports ready: every size from 1 to this, or the entries of `batching.batch_sizes` that
        cover them. Above 32, `batching.batch_sizes` is required with `model.warmup`.""",
    )
    max_wait_ms: float = _setting(
        10.0,
        _number(0, 10_000),
        "Longest the oldest queued image waits for a fuller batch, in milliseconds",
        """0 dispatches whatever is queued as soon as the model is free. A longer wait fills bigger
        batches under light load at the cost of latency; `batching.dispatch_when_idle` skips the
        wait when nothing could join the batch. It must stay below `batching.request_timeout_s`.""",
    )
    max_queue_size: int = _setting(
        64,
        _integer(1, 100_000),
        "Images waiting for a batch, at most; past it, /predict answers 503",
        """A bounded queue turns overload into quick 503s rather than requests that wait out their
        deadline.""",
    )
    dispatch_when_idle: bool = _setting(
        True,
        _boolean,
        "A partial batch goes at once when no request is uploading or decoding",
        """Nothing could join such a batch, so waiting `batching.max_wait_ms` would only add
        latency.""",
    )
    request_timeout_s: float = _setting(
        30.0,
        _number(0.001, 3600),
        "Deadline of one /predict request, in seconds",
        """The deadline covers upload, decode, queue and inference; past it the request gets 504
        and, if its images are still queued, they cost no compute. A client's `X-Request-Timeout`
        header can shorten it, never lengthen it.""",
    )
    max_concurrent_batches: int = _setting(
        0,
        _integer(0, 16),
        "Forward passes in flight, each on its own model thread (0: auto)",
        """Auto runs 2 at once on a CPU with 2 or more cores, each on half of them (see
        `model.num_threads`), and 1 on a GPU or a single core. One pass's OpenMP team waits at every
        barrier for whichever of its threads was pre-empted (by a decode, the event loop or the
        hypervisor), leaving cores idle with work queued, while two passes only share the cores.""",
    )
    batch_sizes: tuple[int, ...] = _setting(
        (),
        _batch_sizes,
        "Allowed batch shapes; a batch is padded up to the next one",
        """Padding uses zero images, so a compiled model sees only these shapes and only these are
        compiled. Empty: with `model.compile = false`, every size from 1 to
        `batching.max_batch_size`; otherwise the powers of two below it and the size itself (`[1,
        2, 4, 8]` for 8), since each compiled shape costs a compile and a copy of the weights.""",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSettings:
    """Which model and weights to load, where to run them and how to prepare the process."""

    name: str = _setting(
        "resnet50",
        _model_name,
        "The torchvision classification model to serve",
        """Any model of `torchvision.models.list_models(module=torchvision.models)`: resnet18,
        efficientnet_b0, convnext_tiny, vit_b_16 and the rest. Its input size, labels and
        preprocessing follow its weights; metrics, spans and the Open Inference Protocol's model
        name follow this name. A bad name stops start-up with the closest valid names.""",
    )
    weights: str = _setting(
        "DEFAULT",
        _weights,
        "Named weights, 'random' or a path to a state_dict file",
        """Named weights are the model's own torchvision weights (`DEFAULT` is its best, for
        ResNet-50 `IMAGENET1K_V2`), from torchvision's cache, downloaded once if missing. A path
        names a file saved with `torch.save(model.state_dict(), path)` from the same
        torchvision model. `random` is a seeded, untrained network with the same compute cost,
        for tests and benchmarks only: its predictions are meaningless.

        Preprocessing follows the chosen weights' own torchvision transform; `random` and
        state_dict files use the `DEFAULT` weights' transform.""",
    )
    device: str = _setting(
        "auto",
        _choice("auto", "cpu", "cuda"),
        "Where the model runs",
        """`auto` picks CUDA when it is available, else the CPU; `cuda` without a GPU fails at
        start-up.""",
    )
    warmup: bool = _setting(
        True,
        _boolean,
        "Run every batch shape once before reporting ready",
        """Warming up spares the first requests the first pass of each shape (or, with
        `model.compile`, its compilation). A failed warm-up makes the process exit 1.""",
    )
    num_threads: int = _setting(
        0,
        _integer(0, 1024),
        "Torch threads of each forward pass (0: auto)",
        """Auto shares the available cores out among the `batching.max_concurrent_batches` passes,
        and gives every core to a one-image batch that starts while no other pass runs, since that
        is the latency an idle server's client sees. Set, every pass gets exactly this many.""",
    )
    interop_threads: int = _setting(
        0, _integer(0, 1024), "Torch inter-op threads (0: torch's default)"
    )
    precision: str = _setting(
        "auto",
        _choice("auto", "fp32", "bf16", "fp16", "int8"),
        "Autocast precision (the weights stay fp32), or int8",
        """`auto` picks bf16 on CPUs with AMX or AVX512-BF16, fp16 on CUDA and fp32 otherwise, and
        logs the choice and why. `int8` (x86 CPUs only, opt-in) quantizes the network
        statically: weights per channel, activations with ranges observed on photos bundled
        with the server (PT2E with torchao's X86 quantizer), then compiled; it needs
        `model.compile`, and always compiles before the server is ready. Its answers differ
        from fp32's: check top-1 accuracy with your weights on your data before serving it
        (docs/performance.md has the measured speed and agreement).""",
    )
    channels_last: bool = _setting(
        True,
        _boolean,
        "NHWC memory format",
        "Faster convolutions on CPU (oneDNN) and on GPU tensor cores.",
    )
    compile: str = _setting(
        "auto",
        _compile_choice,
        "Ahead-of-time compiled forward passes (AOTInductor), cached on disk",
        """Each batch shape is exported and compiled once (with weight freezing) and kept in
        `model.compile_cache_dir`, so only the first start with given settings compiles: minutes
        on a small CPU, with each shape's progress in the logs; later starts load the compiled
        code in seconds. Build the cache before deploying with `batching-server compile`.
        `auto` compiles on a GPU before the server is ready; on a CPU it loads a cache that holds
        every shape before ready, and otherwise is ready at once on the eager model while a
        low-priority process builds the missing shapes, then switches to the compiled code
        (`model_compiled`); a failed build keeps serving eagerly. `true` compiles wherever the
        cache misses, before ready; `false` runs eagerly. The shapes compiled are those of
        `batching.batch_sizes` (by default the powers of two up to `batching.max_batch_size`).""",
    )
    compile_cache_dir: str = _setting(
        "default",
        _cache_dir,
        "Folder of the compiled forward passes ('default': the user's cache folder; '': none)",
        """`default` is `$XDG_CACHE_HOME/batching_server/compiled`, or
        `~/.cache/batching_server/compiled`. One entry per shape, named by a digest of what
        changes the compiled code (model, weights, precision, memory format, batch shape,
        thread count, torch and torchvision versions, CPU model and features or GPU), with a
        manifest and a checksum: a stale or corrupt entry is logged and rebuilt. Entries for
        other settings stay until the folder is deleted. Empty: compile into a temporary folder
        at every start, and `auto` never compiles on a CPU.""",
    )
    seed: int = _setting(0, _integer(0, 2**32 - 1), "Seed of the 'random' weights")
    stall_timeout_s: float = _setting(
        60.0,
        _number(0, 86_400),
        "A forward pass running longer is taken as hung, in seconds (0: never)",
        """A hung pass makes `/ready` and `/health` answer 503 and queued requests fail with 503,
        and the process exits with status 4 so that its supervisor restarts it: a thread stuck in
        native code cannot be stopped. Keep it well above the slowest forward pass of the largest
        batch. Warm-up passes are watched too.""",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSettings:
    """Input limits that keep one request from costing unbounded memory or time."""

    max_upload_bytes: int = _setting(
        20 * 1024 * 1024,
        _integer(1024, 2**31),
        "Request body size at most, in bytes; over it, 413",
    )
    max_image_pixels: int = _setting(
        50_000_000,
        _integer(1, 1_000_000_000),
        "Width x height at most, checked before decoding; over it, 413",
        """The size is read from the image header before any pixel is decoded, so a decompression
        bomb costs nothing.""",
    )
    max_decode_pixels_in_flight: int = _setting(
        100_000_000,
        _integer(1, 10_000_000_000),
        "Pixels decoded at once, summed over the decode threads",
        """A decode takes its image's pixel count (from the header, after any JPEG draft) before
        decoding and gives it back once the tensor is made; others wait their turn. Decoding peaks
        at 8 bytes per pixel (a decoded pixel is at most 4 bytes, and each conversion holds the
        source and one full-size result), so decode memory stays under 8 times this many bytes
        whatever the number of threads: 800 MB by default, which, with upload memory
        (`max_concurrent_uploads` x `max_upload_bytes`, 320 MiB) and the model, fits the 3Gi pod
        of deploy/k8s. The default admits two images at `max_image_pixels`; an image over this
        many pixels still decodes, alone.""",
    )
    max_files_per_request: int = _setting(
        16, _integer(1, 1024), "File parts in one request at most; over it, 400"
    )
    max_concurrent_uploads: int = _setting(
        16,
        _integer(1, 10_000),
        "Requests reading or decoding their upload at once",
        """Requests past this many wait, unread, within their deadline, so upload memory stays under
        this times `limits.max_upload_bytes`.""",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PreprocessSettings:
    """How uploads are decoded."""

    jpeg_draft: bool = _setting(
        True,
        _boolean,
        "Decode large JPEGs at reduced scale",
        """Decoding happens in the DCT domain at 1/2, 1/4 or 1/8 scale, never below the model's
        resize size: a large photo decodes much faster, and the tensor stays within a small, tested
        bound of the full decode.""",
    )
    fast_resize: bool = _setting(
        True,
        _boolean,
        "Resize, crop and normalise on torch's uint8 kernel",
        """An antialiased uint8 resize and one multiply-add replace torchvision's transform
        (Pillow's resize, then separate passes): much faster, with every value within one 8-bit
        level of the reference. `false` gives torchvision's output bit for bit.""",
    )
    threads: int = _setting(0, _integer(0, 256), "Decode threads (0: one per available core)")
    device: str = _setting(
        "auto",
        _choice("auto", "cpu", "model"),
        "Where JPEGs are decoded and transformed: on the CPU, or on the model's device",
        """`model`: the HTTP side checks each upload's header (format, pixel limit, EXIF
        orientation) without decoding it, and queues baseline RGB or greyscale JPEGs still
        encoded; the model thread decodes each batch's JPEGs in one call on the model's device
        (nvJPEG on CUDA), then resizes, crops and normalises them there. Other formats, and
        progressive or CMYK JPEGs, are decoded on the CPU as with `cpu` and join the same batch.
        A JPEG the device cannot decode is retried on the CPU, and a corrupt one is answered
        400 alone. `auto` is `model` when the model runs on CUDA, `cpu` otherwise. On a CPU,
        `model` runs the same path with libjpeg-turbo in the model thread, full-size (no JPEG
        draft): for tests, not for speed. Models whose transform is not a resize-crop-normalise
        always preprocess on the CPU.""",
    )
    device_max_pixels: int = _setting(
        0,
        _integer(0, 10_000_000_000),
        "Pixels one device decode call may produce (0: from the device's free memory)",
        """With `preprocess.device = model`, a batch's JPEGs are decoded in chunks of at most this
        many pixels, so a batch of large photos cannot exhaust the device's memory; an image over
        it decodes alone. Auto takes half of the device's free memory at 22 bytes per pixel (the
        decoded image, the decoder's own planes, and the float copy that is resized); on the CPU
        it is `limits.max_decode_pixels_in_flight`.""",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    """Where ``/metrics`` is served."""

    port: int = _setting(
        0,
        _integer(0, 65535),
        "Separate port for /metrics only (0: on the API port)",
        """With a port set, the API port answers 404 on /metrics, so that metrics need not be
        exposed with the API.""",
    )
    host: str = _setting(
        "", _host_or_empty, "Interface of the metrics port (empty: the same as server.host)"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class OipSettings:
    """The Open Inference Protocol's gRPC endpoint (its REST routes are on the API port)."""

    grpc_port: int = _setting(
        8001,
        _integer(0, 65535),
        "TCP port of the Open Inference Protocol over gRPC (0: no gRPC endpoint)",
        """Triton's port for gRPC, where Triton's client examples expect it. It feeds the
        same batcher as /predict and the REST routes, and auth.api_keys protects it the same
        way. Must differ from server.port and metrics.port.""",
    )
    grpc_host: str = _setting(
        "", _host_or_empty, "Interface of the gRPC port (empty: the same as server.host)"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """Who may call the protected routes."""

    api_keys: tuple[str, ...] = _setting(
        (),
        _api_keys,
        "Bearer tokens accepted on every protected route (empty: no authentication)",
        """A client sends `Authorization: Bearer <key>`. Every route needs one unless it is
        declared public (today /health, /ready and /metrics), and so does a request that
        matches no route. Prefer the environment for secrets, so that they stay out of files:
        `BATCHING_SERVER_AUTH__API_KEYS='["..."]'`.""",
    )

    def __repr__(self) -> str:
        # Keys must never reach a log line or a traceback.
        return f"AuthSettings(api_keys=<{len(self.api_keys)} keys>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    """Log level and format."""

    level: str = _setting(
        "INFO",
        _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", case_insensitive=True),
        "Lowest level written",
    )
    format: str = _setting(
        "json",
        _choice("json", "text"),
        "JSON lines, or text for a terminal",
        "`json` writes one JSON object per line, for a log collector.",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """OpenTelemetry spans: whether to record them and where to send them."""

    enabled: bool = _setting(
        True,
        _boolean,
        "Spans and trace ids (recorded only with an exporter)",
        """Even with no exporter, requests get trace ids: in the logs, and continued from a client's
        `traceparent` header.""",
    )
    exporter: str = _setting(
        "none",
        _choice("none", "otlp-http", "otlp-grpc", "console"),
        "Where spans go",
        """`none`: nothing leaves the process, so no collector is needed, and spans are not recorded
        at all. `otlp-http` and `otlp-grpc` export them in batches from a background thread to
        `tracing.endpoint`, flushed on shutdown; `console` prints them to stdout, for debugging
        only.""",
    )
    endpoint: str = _setting(
        "",
        _text,
        "Collector URL (empty: the OTEL_EXPORTER_OTLP_* variables or the exporter's default)",
        """For example `http://localhost:4318/v1/traces` for otlp-http or `http://localhost:4317`
        for otlp-grpc. When empty, the exporter reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
        `OTEL_EXPORTER_OTLP_ENDPOINT`.""",
    )
    service_name: str = _setting(
        "batching_server",
        _text,
        "service.name of every span",
        "`OTEL_SERVICE_NAME`, when set, wins.",
    )
    sample_ratio: float = _setting(
        1.0,
        _ratio,
        "Share of new traces recorded, with an exporter",
        """A client's sampled `traceparent` is always followed. `OTEL_TRACES_SAMPLER`, when set,
        wins.""",
    )
    excluded_paths: tuple[str, ...] = _setting(
        (),
        _paths,
        "More paths that get no server span",
        """Probes and /metrics never get a server span (their routes say so): they would drown the
        real traffic.""",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The whole validated configuration."""

    server: ServerSettings = field(default_factory=ServerSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    oip: OipSettings = field(default_factory=OipSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """Return a copy with some keys changed, validated like a file would be."""
        raw = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return settings_from_mapping(raw)


_SECTIONS: dict[str, type[Any]] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Settings)
}


@dataclass(frozen=True, slots=True)
class CrossKeyRule:
    """A rule between keys: the keys, the rule in words, and the problem when it is broken.

    A ``warning`` rule does not refuse the settings: its problem is logged at start-up.
    """

    keys: frozenset[str]
    rule: str
    problem: Callable[[Settings], str | None]
    warning: bool = False


# Without batching.batch_sizes, warm-up runs one pass of every size up to max_batch_size,
# N(N+1)/2 images in all: 528 at 32, 32,896 at 256, which would outlast any start-up probe.
MAX_BATCH_SIZE_WITHOUT_BATCH_SIZES = 32


def _queue_holds_a_batch(settings: Settings) -> str | None:
    batching = settings.batching
    if batching.max_queue_size >= batching.max_batch_size:
        return None
    return (
        f"batching.max_queue_size ({batching.max_queue_size}) must be at least "
        f"batching.max_batch_size ({batching.max_batch_size}), or no batch can fill"
    )


def _largest_shape_holds_a_batch(settings: Settings) -> str | None:
    batching = settings.batching
    if not batching.batch_sizes or batching.batch_sizes[-1] >= batching.max_batch_size:
        return None
    return (
        f"the largest of batching.batch_sizes ({batching.batch_sizes[-1]}) must be at "
        f"least batching.max_batch_size ({batching.max_batch_size})"
    )


def _metrics_port_is_its_own(settings: Settings) -> str | None:
    if not settings.metrics.port or settings.metrics.port != settings.server.port:
        return None
    return (
        f"metrics.port ({settings.metrics.port}) must differ from server.port, or "
        "be 0 to serve /metrics on the API port"
    )


def _grpc_port_is_its_own(settings: Settings) -> str | None:
    port = settings.oip.grpc_port
    if not port or port not in (settings.server.port, settings.metrics.port):
        return None
    return (
        f"oip.grpc_port ({port}) must differ from server.port and metrics.port, "
        "or be 0 to serve no gRPC endpoint"
    )


def _warmup_has_few_shapes(settings: Settings) -> str | None:
    batching = settings.batching
    size = batching.max_batch_size
    if batching.batch_sizes or not settings.model.warmup:
        return None
    if size <= MAX_BATCH_SIZE_WITHOUT_BATCH_SIZES:
        return None
    powers = list(_powers_of_two_to(size))
    return (
        f"batching.max_batch_size ({size}) above {MAX_BATCH_SIZE_WITHOUT_BATCH_SIZES} needs "
        f"batching.batch_sizes with model.warmup: warm-up would run every size from 1 to "
        f"{size} ({size * (size + 1) // 2} images) before the server is ready; set "
        f"batching.batch_sizes, such as {powers}, or lower batching.max_batch_size"
    )


def _wait_fits_the_deadline(settings: Settings) -> str | None:
    batching = settings.batching
    if batching.max_wait_ms < batching.request_timeout_s * 1000:
        return None
    return (
        f"batching.max_wait_ms ({batching.max_wait_ms:g}) must be below "
        f"batching.request_timeout_s ({batching.request_timeout_s:g} s), or an image "
        "waiting for a fuller batch would pass its deadline before it is dispatched"
    )


def _drain_covers_a_request(settings: Settings) -> str | None:
    drain_s = settings.server.graceful_shutdown_timeout_s
    request_s = settings.batching.request_timeout_s
    if drain_s >= request_s:
        return None
    return (
        f"server.graceful_shutdown_timeout_s ({drain_s:g}) is below "
        f"batching.request_timeout_s ({request_s:g}): on shutdown, requests that would "
        "have finished within their deadline may fail with 503 shutting_down"
    )


def _request_fits_the_queue(settings: Settings) -> str | None:
    limits, batching = settings.limits, settings.batching
    if limits.max_files_per_request <= batching.max_queue_size:
        return None
    return (
        f"limits.max_files_per_request ({limits.max_files_per_request}) must not "
        f"exceed batching.max_queue_size ({batching.max_queue_size}), or such a "
        "request could never be admitted"
    )


def _weights_fit_the_model(settings: Settings) -> str | None:
    model = settings.model
    named = _WEIGHTS_NAME.fullmatch(model.weights) and not Path(model.weights).is_file()
    if model.weights == "random" or not named or not _CATALOGUE_CHECK.get():
        return None
    from .models.torchvision_spec import torchvision_classifier

    names = torchvision_classifier(model.name).weight_names
    if model.weights in names:
        return None
    return (
        f"model.weights ({model.weights!r}) is not one of {model.name}'s named weights: "
        f"{', '.join(names)}; or use 'random', or the path of a state_dict file"
    )


def _int8_runs_compiled_on_a_cpu(settings: Settings) -> str | None:
    model = settings.model
    if model.precision != "int8":
        return None
    if model.device == "cuda":
        return "model.precision 'int8' runs on x86 CPUs only; model.device is 'cuda'"
    if model.compile == "false":
        return (
            "model.precision 'int8' runs only as compiled graphs; set model.compile to "
            "'auto' or 'true'"
        )
    return None


# In the order their problems are reported.
CROSS_KEY_RULES = (
    CrossKeyRule(
        frozenset({"model.name", "model.weights"}),
        "Named `model.weights` must be one of `model.name`'s own torchvision weights "
        "(`DEFAULT` always is).",
        _weights_fit_the_model,
    ),
    CrossKeyRule(
        frozenset({"model.precision", "model.device", "model.compile"}),
        '`model.precision = "int8"` needs `model.compile` (`auto` or `true`) and a CPU: its '
        "int8 kernels exist only in the compiled graphs, for x86.",
        _int8_runs_compiled_on_a_cpu,
    ),
    CrossKeyRule(
        frozenset({"batching.max_queue_size", "batching.max_batch_size"}),
        "`batching.max_queue_size` must be at least `batching.max_batch_size`, or no batch "
        "could fill.",
        _queue_holds_a_batch,
    ),
    CrossKeyRule(
        frozenset({"batching.batch_sizes", "batching.max_batch_size"}),
        "When `batching.batch_sizes` is set, its largest entry must be at least "
        "`batching.max_batch_size`, so that every batch has a shape to be padded to.",
        _largest_shape_holds_a_batch,
    ),
    CrossKeyRule(
        frozenset({"metrics.port", "server.port"}),
        "`metrics.port` must differ from `server.port`; 0 serves /metrics on the API port instead.",
        _metrics_port_is_its_own,
    ),
    CrossKeyRule(
        frozenset({"oip.grpc_port", "server.port", "metrics.port"}),
        "`oip.grpc_port` must differ from `server.port` and `metrics.port`; 0 turns gRPC off.",
        _grpc_port_is_its_own,
    ),
    CrossKeyRule(
        frozenset({"limits.max_files_per_request", "batching.max_queue_size"}),
        "`limits.max_files_per_request` must not exceed `batching.max_queue_size`, or a "
        "request with that many files could never be admitted.",
        _request_fits_the_queue,
    ),
    CrossKeyRule(
        frozenset({"batching.max_batch_size", "batching.batch_sizes", "model.warmup"}),
        f"With `model.warmup`, `batching.max_batch_size` above "
        f"{MAX_BATCH_SIZE_WITHOUT_BATCH_SIZES} needs `batching.batch_sizes`: warm-up would "
        "otherwise run every size from 1 up, N(N+1)/2 images (32,896 at 256), and outlast any "
        "start-up probe.",
        _warmup_has_few_shapes,
    ),
    CrossKeyRule(
        frozenset({"batching.max_wait_ms", "batching.request_timeout_s"}),
        "`batching.max_wait_ms` must be below `batching.request_timeout_s`, or an image "
        "waiting for a fuller batch would pass its deadline before it is dispatched.",
        _wait_fits_the_deadline,
    ),
    CrossKeyRule(
        frozenset({"server.graceful_shutdown_timeout_s", "batching.request_timeout_s"}),
        "A warning, not an error: `server.graceful_shutdown_timeout_s` below "
        "`batching.request_timeout_s` cuts off, on shutdown, requests that would have "
        "finished within their deadline (they get 503 `shutting_down`). A short drain can be "
        "the right trade, where restarts must be quick and clients retry.",
        _drain_covers_a_request,
        warning=True,
    ),
)


def _cross_checks(settings: Settings) -> list[tuple[set[str], str]]:
    """Problems between keys, each with the keys it involves."""
    return [
        (set(rule.keys), message)
        for rule in CROSS_KEY_RULES
        if not rule.warning and (message := rule.problem(settings)) is not None
    ]


def settings_warnings(settings: Settings) -> list[str]:
    """Choices between keys that are allowed but likely unintended, to log at start-up."""
    return [
        message
        for rule in CROSS_KEY_RULES
        if rule.warning and (message := rule.problem(settings)) is not None
    ]


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Validate a nested mapping (section -> key -> value) into ``Settings``."""
    problems: list[str] = []
    bad_keys: set[str] = set()
    sections: dict[str, Any] = {}
    lowered = {str(k).lower(): v for k, v in raw.items()}
    for name in sorted(set(lowered) - set(_SECTIONS)):
        problems.append(f"unknown section [{name}]; known: {', '.join(_SECTIONS)}")
    for name, section_cls in _SECTIONS.items():
        values = lowered.get(name, {})
        if not isinstance(values, Mapping):
            problems.append(f"[{name}] must be a table of keys, got {values!r}")
            values = {}
        sections[name] = _build_section(name, section_cls, values, problems, bad_keys)
    settings = _with_compiled_shapes(Settings(**sections))
    # A cross-key problem is reported with the others, unless one of its keys is
    # already reported as bad (its default stood in, so the comparison would mislead).
    problems += [msg for keys, msg in _cross_checks(settings) if not keys & bad_keys]
    if problems:
        raise SettingsError(problems)
    return settings


def _with_compiled_shapes(settings: Settings) -> Settings:
    """Empty ``batching.batch_sizes`` made the powers of two up to ``max_batch_size`` when
    the model may be compiled: every size would be a compile and a copy of the weights each."""
    batching = settings.batching
    if batching.batch_sizes or settings.model.compile == "false":
        return settings
    batching = dataclasses.replace(batching, batch_sizes=_powers_of_two_to(batching.max_batch_size))
    return dataclasses.replace(settings, batching=batching)


def _powers_of_two_to(size: int) -> tuple[int, ...]:
    """The powers of two below ``size``, then ``size``: 1, 2, 4, 8, 12 for 12."""
    return (*(1 << power for power in range(size.bit_length()) if 1 << power < size), size)


def _build_section(
    name: str,
    section_cls: type[Any],
    values: Mapping[str, Any],
    problems: list[str],
    bad_keys: set[str],
) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    given = {str(k).lower(): v for k, v in values.items()}
    for key in sorted(set(given) - set(fields)):
        problems.append(f"unknown setting {name}.{key}; known: {', '.join(fields)}")
    kwargs = {}
    for key, value in given.items():
        if key not in fields:
            continue
        try:
            kwargs[key] = fields[key].metadata["check"](value)
        except ValueError as exc:
            problems.append(f"{name}.{key} must be {exc}, got {value!r}")
            bad_keys.add(f"{name}.{key}")
    return section_cls(**kwargs)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read ``path`` (if given) and ``BATCHING_SERVER_*`` variables, then validate.

    Variables use ``__`` between section and key and win over the file:
    ``BATCHING_SERVER_BATCHING__MAX_BATCH_SIZE=16``. Values are parsed as TOML.
    """
    files = []
    if path is not None:
        settings_path = Path(path).expanduser()
        if not settings_path.is_file():
            raise SettingsError([f"settings file {str(settings_path)!r} does not exist"])
        if settings_path.suffix.lower() != ".toml":
            # dynaconf picks a parser by suffix and silently skips files it has none for.
            raise SettingsError(
                [f"settings file {str(settings_path)!r} must be TOML with a .toml suffix"]
            )
        files.append(str(settings_path))
    try:
        conf = Dynaconf(settings_files=files, envvar_prefix=ENV_PREFIX, environments=False)
        raw = conf.as_dict()
    except Exception as exc:  # dynaconf raises parser-specific types for a malformed file
        raise SettingsError([f"could not read settings: {exc}"]) from exc
    return settings_from_mapping(raw)
