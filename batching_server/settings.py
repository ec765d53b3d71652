"""Settings: load ``settings.toml`` and ``BATCHING_SERVER_*`` variables, validate, freeze.

Every key has a default here, so the server runs with no file at all. Validation collects
every problem before it fails, so an operator fixes a bad config in one pass.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynaconf import Dynaconf

__all__ = [
    "ENV_PREFIX",
    "AuthSettings",
    "BatchingSettings",
    "LimitsSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ModelSettings",
    "PreprocessSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "TracingSettings",
    "load_settings",
    "settings_from_mapping",
]

ENV_PREFIX = "BATCHING_SERVER"
NAMED_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2")

Check = Callable[[Any], Any]


class SettingsError(Exception):
    """One or more settings are invalid; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid settings ({len(problems)} {noun}):\n{lines}")


# Each check takes the raw value and returns the typed one, or raises ValueError with the
# expectation in words; the caller prefixes the key and appends the bad value.


def _integer(low: int, high: int) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value

    return check


def _number(low: float, high: float) -> Check:
    def check(value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ValueError(f"a number from {low:g} to {high:g}")
        return float(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _choice(*choices: str, case_insensitive: bool = False) -> Check:
    def check(value: Any) -> str:
        if isinstance(value, str):
            wanted = value.upper() if case_insensitive else value
            for choice in choices:
                if wanted == (choice.upper() if case_insensitive else choice):
                    return choice
        raise ValueError("one of " + ", ".join(repr(c) for c in choices))

    return check


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise ValueError("a host name or IP address without spaces, such as '127.0.0.1'")
    return value


def _host_or_empty(value: Any) -> str:
    return "" if value == "" else _host(value)


def _weights(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"one of {', '.join(NAMED_WEIGHTS)}, 'random', or a path to a state_dict")
    if value in NAMED_WEIGHTS or value == "random":
        return value
    if value.upper() in NAMED_WEIGHTS:
        return value.upper()
    if not Path(value).expanduser().is_file():
        raise ValueError(
            f"one of {', '.join(NAMED_WEIGHTS)}, 'random', or the path of an existing "
            "state_dict file (no such file)"
        )
    return str(Path(value).expanduser())


def _paths(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(p, str) and p.startswith("/") for p in value
    ):
        raise ValueError('a list of URL paths, such as ["/metrics", "/health"]')
    return tuple(value)


def _batch_sizes(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list | tuple)
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256 for v in value)
        or list(value) != sorted(set(value))
    ):
        raise ValueError("a strictly increasing list of integers from 1 to 256, such as [1, 4, 8]")
    return tuple(value)


def _api_keys(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(k, str) and len(k) >= 16 and k.isprintable() and " " not in k for k in value
    ):
        raise ValueError("a list of API keys, each at least 16 printable characters, no spaces")
    return tuple(value)


def _ratio(value: Any) -> float:
    return float(_number(0.0, 1.0)(value))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _setting(default: Any, check: Check, doc: str) -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """Where the HTTP server listens and how long it may take to drain."""

    host: str = _setting("127.0.0.1", _host, "interface to bind")
    port: int = _setting(8080, _integer(0, 65535), "TCP port (0 picks a free one)")
    graceful_shutdown_timeout_s: float = _setting(
        30.0, _number(0, 3600), "time to finish accepted requests after SIGTERM"
    )
    low_priority_workers: bool = _setting(
        True,
        _boolean,
        "decode and model threads run below the event loop's priority (nice +10 and +19, Linux)",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchingSettings:
    """How the dynamic batcher groups images into forward passes."""

    max_batch_size: int = _setting(8, _integer(1, 256), "images in one forward pass at most")
    max_wait_ms: float = _setting(
        10.0, _number(0, 10_000), "longest the oldest queued image waits for a fuller batch"
    )
    max_queue_size: int = _setting(64, _integer(1, 100_000), "images waiting, at most")
    dispatch_when_idle: bool = _setting(
        True, _boolean, "a partial batch goes at once when no request is uploading or decoding"
    )
    request_timeout_s: float = _setting(30.0, _number(0.001, 3600), "deadline of one request")
    max_concurrent_batches: int = _setting(
        0, _integer(0, 16), "forward passes in flight (0: 2 on a CPU, 1 on a GPU)"
    )
    batch_sizes: tuple[int, ...] = _setting(
        (), _batch_sizes, "allowed batch shapes; a batch is padded up to the next one"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSettings:
    """Which weights to load, where to run them and how to prepare the process."""

    weights: str = _setting("IMAGENET1K_V2", _weights, "named weights, 'random' or a path")
    device: str = _setting("auto", _choice("auto", "cpu", "cuda"), "where the model runs")
    warmup: bool = _setting(True, _boolean, "run every batch size once before ready")
    num_threads: int = _setting(
        0, _integer(0, 1024), "torch threads per forward pass (0: the cores shared out)"
    )
    interop_threads: int = _setting(0, _integer(0, 1024), "torch inter-op threads (0: torch's)")
    precision: str = _setting(
        "auto", _choice("auto", "fp32", "bf16", "fp16"), "autocast precision; auto: native"
    )
    channels_last: bool = _setting(True, _boolean, "NHWC memory format (faster on CPU and GPU)")
    compile: bool = _setting(False, _boolean, "torch.compile (inductor, freezing) at warm-up")
    seed: int = _setting(0, _integer(0, 2**32 - 1), "seed of the 'random' weights")
    stall_timeout_s: float = _setting(
        60.0,
        _number(0, 86_400),
        "a forward pass running longer marks the server failed; it exits 4 (0: never)",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSettings:
    """Input limits that keep one request from costing unbounded memory or time."""

    max_upload_bytes: int = _setting(
        20 * 1024 * 1024, _integer(1024, 2**31), "request body size at most"
    )
    max_image_pixels: int = _setting(
        50_000_000, _integer(1, 1_000_000_000), "width x height at most, checked before decoding"
    )
    max_files_per_request: int = _setting(16, _integer(1, 1024), "file parts in one request")
    max_concurrent_uploads: int = _setting(
        16, _integer(1, 10_000), "requests reading or decoding their upload at once"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PreprocessSettings:
    """How uploads are decoded."""

    jpeg_draft: bool = _setting(True, _boolean, "decode JPEGs at reduced scale when large")
    fast_resize: bool = _setting(True, _boolean, "resize on torch's uint8 kernel")
    threads: int = _setting(0, _integer(0, 256), "decode threads (0: one per core)")


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    """Where ``/metrics`` is served."""

    port: int = _setting(
        0, _integer(0, 65535), "separate port for /metrics only (0: on the API port)"
    )
    host: str = _setting("", _host_or_empty, "interface of that port (empty: server.host)")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """Who may call ``/predict``."""

    api_keys: tuple[str, ...] = _setting((), _api_keys, "bearer tokens; empty: no auth")

    def __repr__(self) -> str:
        # Keys must never reach a log line or a traceback.
        return f"AuthSettings(api_keys=<{len(self.api_keys)} keys>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    """Log level and format."""

    level: str = _setting(
        "INFO",
        _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", case_insensitive=True),
        "lowest level written",
    )
    format: str = _setting("json", _choice("json", "text"), "json lines, or text for a terminal")


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """OpenTelemetry spans: whether to record them and where to send them."""

    enabled: bool = _setting(True, _boolean, "spans and trace ids (recorded only with an exporter)")
    exporter: str = _setting(
        "none", _choice("none", "otlp-http", "otlp-grpc", "console"), "where spans go"
    )
    endpoint: str = _setting(
        "", _text, "collector URL; empty: OTEL_EXPORTER_OTLP_* variables or the default"
    )
    service_name: str = _setting("batching_server", _text, "service.name of every span")
    sample_ratio: float = _setting(1.0, _ratio, "share of new traces recorded, 0 to 1")
    excluded_paths: tuple[str, ...] = _setting(
        (), _paths, "more paths that get no server span (probes and /metrics never do)"
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


def _cross_checks(settings: Settings) -> list[tuple[set[str], str]]:
    """Problems between keys, each with the keys it involves."""
    batching, limits = settings.batching, settings.limits
    problems = []
    if batching.max_queue_size < batching.max_batch_size:
        problems.append(
            (
                {"batching.max_queue_size", "batching.max_batch_size"},
                f"batching.max_queue_size ({batching.max_queue_size}) must be at least "
                f"batching.max_batch_size ({batching.max_batch_size}), or no batch can fill",
            )
        )
    if batching.batch_sizes and batching.batch_sizes[-1] < batching.max_batch_size:
        problems.append(
            (
                {"batching.batch_sizes", "batching.max_batch_size"},
                f"the largest of batching.batch_sizes ({batching.batch_sizes[-1]}) must be at "
                f"least batching.max_batch_size ({batching.max_batch_size})",
            )
        )
    if settings.metrics.port and settings.metrics.port == settings.server.port:
        problems.append(
            (
                {"metrics.port", "server.port"},
                f"metrics.port ({settings.metrics.port}) must differ from server.port, or "
                "be 0 to serve /metrics on the API port",
            )
        )
    if limits.max_files_per_request > batching.max_queue_size:
        problems.append(
            (
                {"limits.max_files_per_request", "batching.max_queue_size"},
                f"limits.max_files_per_request ({limits.max_files_per_request}) must not "
                f"exceed batching.max_queue_size ({batching.max_queue_size}), or such a "
                "request could never be admitted",
            )
        )
    return problems


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
    settings = Settings(**sections)
    # A cross-key problem is reported with the others, unless one of its keys is
    # already reported as bad (its default stood in, so the comparison would mislead).
    problems += [msg for keys, msg in _cross_checks(settings) if not keys & bad_keys]
    if problems:
        raise SettingsError(problems)
    return settings


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
