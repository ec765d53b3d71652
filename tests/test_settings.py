"""Settings: defaults, settings.toml, BATCHING_SERVER_* overrides, and validation."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from batching_server.settings import (
    Settings,
    SettingsError,
    load_settings,
    settings_from_mapping,
    settings_warnings,
)

REPO_SETTINGS = Path(__file__).resolve().parent.parent / "settings.toml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BATCHING_SERVER_* (or dynaconf) variable from the shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("BATCHING_SERVER") or name.endswith("_FOR_DYNACONF"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(SettingsError) as raised:
        settings_from_mapping(raw)
    return raised.value.problems


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    # Settings() with the shapes its model.compile (auto) implies: [1, 2, 4, 8].
    assert settings == settings_from_mapping({})
    assert settings.batching.batch_sizes == (1, 2, 4, 8)
    assert settings.server.port == 8080
    assert settings.server.host == "127.0.0.1"
    assert settings.batching.max_batch_size == 8
    assert settings.batching.max_wait_ms == 10.0
    assert settings.batching.max_queue_size == 64
    assert settings.model.name == "resnet50"
    assert settings.model.weights == "DEFAULT"
    assert settings.limits.max_image_pixels == 50_000_000
    assert settings.logging.format == "json"


def test_no_implicit_settings_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(tmp_path, "[server]\nport = 1234\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().server.port == 8080


def _lists(pairs: list[tuple[str, object]]) -> dict[str, object]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pairs}


def test_repo_settings_toml_documents_exactly_the_defaults() -> None:
    documented = tomllib.loads(REPO_SETTINGS.read_text(encoding="utf-8"))
    # TOML has arrays where the settings hold tuples.
    defaults = dataclasses.asdict(Settings(), dict_factory=_lists)
    assert documented == defaults
    assert load_settings(REPO_SETTINGS) == settings_from_mapping({})


def test_values_from_a_file_lower_and_mixed_case(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        "[batching]\nmax_batch_size = 4\nmax_wait_ms = 2.5\n"
        '[Model]\nWeights = "random"\nwarmup = false\n'
        '[logging]\nlevel = "debug"\nformat = "text"\n',
    )
    settings = load_settings(path)
    assert settings.batching.max_batch_size == 4
    assert settings.batching.max_wait_ms == 2.5
    assert settings.batching.max_queue_size == 64
    assert settings.model.weights == "random"
    assert settings.model.warmup is False
    assert settings.logging.level == "DEBUG"
    assert settings.logging.format == "text"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHING_SERVER_BATCHING__MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("BATCHING_SERVER_MODEL__WEIGHTS", "random")
    monkeypatch.setenv("BATCHING_SERVER_MODEL__WARMUP", "false")
    monkeypatch.setenv("BATCHING_SERVER_BATCHING__MAX_WAIT_MS", "0.5")
    settings = load_settings()
    assert settings.batching.max_batch_size == 16
    assert settings.batching.max_wait_ms == 0.5
    assert settings.model.weights == "random"
    assert settings.model.warmup is False


def test_environment_wins_over_the_file_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path, "[batching]\nmax_batch_size = 4\nmax_wait_ms = 2.5\n")
    monkeypatch.setenv("BATCHING_SERVER_BATCHING__MAX_BATCH_SIZE", "16")
    settings = load_settings(path)
    assert settings.batching.max_batch_size == 16
    assert settings.batching.max_wait_ms == 2.5


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[server]\nport = "abc"\n'
        "[batching]\nmax_batch_size = -3\nmax_batchsize = 4\n"
        '[model]\nweights = "/no/such/file.pt"\n'
        '[logging]\nformat = "yaml"\n'
        "[foo]\nbar = 1\n",
    )
    with pytest.raises(SettingsError) as raised:
        load_settings(path)
    problems = raised.value.problems
    assert len(problems) == 6
    expected = [
        "unknown section [foo]",
        "server.port must be an integer from 0 to 65535, got 'abc'",
        "batching.max_batch_size must be an integer from 1 to 256, got -3",
        "unknown setting batching.max_batchsize",
        "model.weights must be 'DEFAULT' or another of the model's named weights (any case), "
        "'random', or the path of an existing state_dict file (no such file)",
        "logging.format must be one of 'json', 'text', got 'yaml'",
    ]
    for fragment in expected:
        assert sum(fragment in problem for problem in problems) == 1, fragment
    assert "'/no/such/file.pt'" in next(p for p in problems if p.startswith("model.weights"))
    assert str(raised.value).startswith("invalid settings (6 problems):")


def test_environment_problems_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHING_SERVER_SERVER__PORT", "abc")
    monkeypatch.setenv("BATCHING_SERVER_BATCHING__MAX_WAIT_MS", "-1")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert raised.value.problems == [
        "server.port must be an integer from 0 to 65535, got 'abc'",
        "batching.max_wait_ms must be a number from 0 to 10000, got -1",
    ]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        pytest.param(
            "batching", "max_batch_size", True, "an integer from 1 to 256, got True", id="bool-int"
        ),
        pytest.param(
            "server", "port", 8080.0, "an integer from 0 to 65535, got 8080.0", id="float"
        ),
        pytest.param("server", "port", 65536, "an integer from 0 to 65535, got 65536", id="range"),
        pytest.param(
            "batching", "max_wait_ms", False, "a number from 0 to 10000, got False", id="bool-num"
        ),
        pytest.param(
            "batching", "max_wait_ms", float("nan"), "a number from 0 to 10000, got nan", id="nan"
        ),
        pytest.param("model", "warmup", "yes", "true or false, got 'yes'", id="bool-string"),
        pytest.param("model", "device", "tpu", "one of 'auto', 'cpu', 'cuda'", id="device"),
        pytest.param("server", "host", "my host", "without spaces", id="host"),
        pytest.param("metrics", "host", " ", "without spaces", id="metrics-host"),
        pytest.param("oip", "grpc_port", -1, "an integer from 0 to 65535, got -1", id="grpc-port"),
        pytest.param("oip", "grpc_host", " ", "without spaces", id="grpc-host"),
        pytest.param("model", "stall_timeout_s", -1, "a number from 0 to 86400", id="stall"),
        pytest.param("model", "weights", "", "state_dict file, got ''", id="no-weights"),
        pytest.param("logging", "level", "LOUD", "got 'LOUD'", id="level"),
    ],
)
def test_bad_value_names_key_and_value(section: str, key: str, value: Any, message: str) -> None:
    problems = problems_of({section: {key: value}})
    assert len(problems) == 1
    assert problems[0].startswith(f"{section}.{key} must be ")
    assert message in problems[0]


def test_section_that_is_not_a_table() -> None:
    assert problems_of({"server": 5}) == ["[server] must be a table of keys, got 5"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(
            {"batching": {"max_batch_size": 32, "max_queue_size": 16}},
            "batching.max_queue_size (16) must be at least batching.max_batch_size (32)",
            id="queue-below-batch",
        ),
        pytest.param(
            {"batching": {"max_batch_size": 4, "max_queue_size": 8}},
            "limits.max_files_per_request (16) must not exceed batching.max_queue_size (8)",
            id="files-above-queue",
        ),
        pytest.param(
            {"server": {"port": 9000}, "metrics": {"port": 9000}},
            "metrics.port (9000) must differ from server.port",
            id="metrics-on-the-api-port",
        ),
        pytest.param(
            {"server": {"port": 8001}},
            "oip.grpc_port (8001) must differ from server.port and metrics.port",
            id="api-on-the-grpc-port",
        ),
        pytest.param(
            {"metrics": {"port": 9464}, "oip": {"grpc_port": 9464}},
            "oip.grpc_port (9464) must differ from server.port and metrics.port",
            id="grpc-on-the-metrics-port",
        ),
        pytest.param(
            {
                "batching": {"max_batch_size": 256, "max_queue_size": 256},
                "model": {"compile": "false"},  # compiled, it gets power-of-two shapes
            },
            "batching.max_batch_size (256) above 32 needs batching.batch_sizes with "
            "model.warmup: warm-up would run every size from 1 to 256 (32896 images) before "
            "the server is ready; set batching.batch_sizes, such as "
            "[1, 2, 4, 8, 16, 32, 64, 128, 256], or lower batching.max_batch_size",
            id="warmup-of-256-shapes",
        ),
        pytest.param(
            {"model": {"precision": "int8", "compile": "false"}},
            "model.precision 'int8' runs only as compiled graphs; set model.compile to "
            "'auto' or 'true'",
            id="int8-eager",
        ),
        pytest.param(
            {"model": {"precision": "int8", "device": "cuda"}},
            "model.precision 'int8' runs on x86 CPUs only; model.device is 'cuda'",
            id="int8-on-a-gpu",
        ),
        pytest.param(
            {"batching": {"max_wait_ms": 2000, "request_timeout_s": 2}},
            "batching.max_wait_ms (2000) must be below batching.request_timeout_s (2 s)",
            id="wait-past-the-deadline",
        ),
    ],
)
def test_cross_field_checks(raw: dict[str, Any], message: str) -> None:
    problems = problems_of(raw)
    assert len(problems) == 1
    assert problems[0].startswith(message)


@pytest.mark.parametrize(
    "batching",
    [
        pytest.param({"max_batch_size": 32}, id="32-shapes-are-fine"),
        pytest.param(
            {"max_batch_size": 256, "max_queue_size": 256, "batch_sizes": [8, 64, 256]},
            id="few-shapes",
        ),
    ],
)
def test_large_batches_need_few_shapes_only_with_warmup(batching: dict[str, Any]) -> None:
    eager = {"compile": "false"}
    settings = settings_from_mapping({"batching": batching, "model": eager})
    assert settings.batching.batch_sizes == tuple(batching.get("batch_sizes", ()))
    unwarmed = {"batching": {"max_batch_size": 256, "max_queue_size": 256}}
    settings = settings_from_mapping(unwarmed | {"model": {"warmup": False}})
    assert settings.batching.max_batch_size == 256


def test_a_drain_shorter_than_a_request_is_a_warning_not_an_error() -> None:
    assert settings_warnings(Settings()) == []  # 30 s each by default
    settings = settings_from_mapping(
        {"server": {"graceful_shutdown_timeout_s": 10}, "batching": {"request_timeout_s": 30}}
    )
    assert settings_warnings(settings) == [
        "server.graceful_shutdown_timeout_s (10) is below batching.request_timeout_s (30): "
        "on shutdown, requests that would have finished within their deadline may fail with "
        "503 shutting_down"
    ]


def test_keepalive_timeout_is_below_an_hour_by_default_and_settable() -> None:
    # aiohttp's hand-built runner would keep an idle connection about an hour.
    assert Settings().server.keepalive_timeout_s == 75.0
    settings = settings_from_mapping({"server": {"keepalive_timeout_s": 650}})
    assert settings.server.keepalive_timeout_s == 650.0
    assert problems_of({"server": {"keepalive_timeout_s": 0}}) == [
        "server.keepalive_timeout_s must be a number from 1 to 3600, got 0"
    ]


def test_cross_field_bounds_are_inclusive() -> None:
    settings = settings_from_mapping(
        {"batching": {"max_batch_size": 16, "max_queue_size": 16}, "limits": {}}
    )
    assert settings.batching.max_queue_size == settings.limits.max_files_per_request == 16


def test_cross_field_problem_is_reported_with_an_unrelated_bad_value() -> None:
    """One pass fixes a config: a bad port must not hide a queue smaller than a batch."""
    problems = problems_of(
        {
            "server": {"port": "abc"},
            "batching": {"max_queue_size": 4},
            "limits": {"max_files_per_request": 4},
        }
    )
    assert len(problems) == 2
    assert problems[0] == "server.port must be an integer from 0 to 65535, got 'abc'"
    assert problems[1].startswith("batching.max_queue_size (4) must be at least")


def test_missing_settings_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError) as raised:
        load_settings(missing)
    assert raised.value.problems == [f"settings file {str(missing)!r} does not exist"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[server\nport = 1\n", id="unclosed-table"),
        pytest.param("[server]\nport = 1\nport = 2\n", id="duplicate-key"),
        pytest.param("[server]\nport = \n", id="no-value"),
    ],
)
def test_malformed_toml(tmp_path: Path, text: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(write_toml(tmp_path, text))
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith("could not read settings: ")


@pytest.mark.parametrize("name", ["production", "settings.txt", "settings.yaml"])
def test_a_settings_file_without_toml_suffix_is_refused(tmp_path: Path, name: str) -> None:
    """An explicit file is never silently ignored (dynaconf skips suffixes it cannot parse)."""
    path = write_toml(tmp_path, "[server]\nport = 1234\n", name=name)
    with pytest.raises(SettingsError, match=r"\.toml suffix"):
        load_settings(path)


def test_existing_weights_file_is_accepted(tmp_path: Path) -> None:
    weights = tmp_path / "resnet50.pt"
    weights.write_bytes(b"not checked until the model loads")
    settings = settings_from_mapping({"model": {"weights": str(weights)}})
    assert settings.model.weights == str(weights)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("imagenet1k_v2", "IMAGENET1K_V2", id="lower"),
        pytest.param("ImageNet1K_V1", "IMAGENET1K_V1", id="mixed"),
        pytest.param("random", "random", id="random"),
    ],
)
def test_named_weights_are_case_insensitive(given: str, expected: str) -> None:
    assert settings_from_mapping({"model": {"weights": given}}).model.weights == expected


def test_replace_changes_only_the_given_keys() -> None:
    base = settings_from_mapping({"model": {"weights": "random"}, "server": {"host": "0.0.0.0"}})
    replaced = base.replace(server={"port": 9000})
    assert replaced.server.port == 9000
    assert replaced.server.host == "0.0.0.0"
    assert replaced.model == base.model
    assert base.server.port == 8080


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        pytest.param({"server": {"port": 70000}}, "server.port", id="bad-value"),
        pytest.param({"server": {"prot": 1}}, "unknown setting server.prot", id="unknown-key"),
        pytest.param(
            {"batching": {"max_batch_size": 100, "batch_sizes": [100]}},
            "batching.max_queue_size (64) must be at least batching.max_batch_size (100)",
            id="cross-field",
        ),
    ],
)
def test_replace_validates(sections: dict[str, dict[str, Any]], fragment: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings().replace(**sections)
    assert len(raised.value.problems) == 1
    assert fragment in raised.value.problems[0]


def test_any_torchvision_classifier_with_its_own_weights() -> None:
    settings = settings_from_mapping(
        {"model": {"name": "efficientnet_b1", "weights": "imagenet1k_v2"}}
    )
    assert (settings.model.name, settings.model.weights) == ("efficientnet_b1", "IMAGENET1K_V2")
    assert settings_from_mapping({"model": {"name": "resnet18"}}).model.weights == "DEFAULT"


def test_a_bad_model_name_lists_the_closest_valid_ones() -> None:
    (problem,) = problems_of({"model": {"name": "resnet5"}})
    assert problem.startswith("model.name must be the name of a torchvision classification model")
    assert "closest: resnet50, " in problem
    closest, others = problem.split("closest: ", 1)[1].split("; the others: ")
    assert "resnet18" in closest.split(", ")
    # Every valid name is listed, closest first.
    assert {"vit_b_16", "convnext_tiny", "efficientnet_b0"} <= set(others.split(")")[0].split(", "))
    assert problem.endswith("got 'resnet5'")


def test_named_weights_must_be_the_models_own() -> None:
    (problem,) = problems_of({"model": {"name": "resnet18", "weights": "IMAGENET1K_V2"}})
    assert problem == (
        "model.weights ('IMAGENET1K_V2') is not one of resnet18's named weights: "
        "IMAGENET1K_V1, DEFAULT; or use 'random', or the path of a state_dict file"
    )
    # A bad model name is reported once, not again as a weights problem.
    assert len(problems_of({"model": {"name": "nope", "weights": "IMAGENET1K_V2"}})) == 1


@pytest.mark.parametrize(
    ("max_batch_size", "expected"),
    [(1, (1,)), (3, (1, 2, 3)), (8, (1, 2, 4, 8)), (12, (1, 2, 4, 8, 12))],
)
def test_a_model_that_may_compile_gets_power_of_two_shapes(
    max_batch_size: int, expected: tuple[int, ...]
) -> None:
    raw = {"batching": {"max_batch_size": max_batch_size}}
    assert settings_from_mapping(raw).batching.batch_sizes == expected  # compile = auto
    raw["model"] = {"compile": "true"}
    assert settings_from_mapping(raw).batching.batch_sizes == expected


def test_batch_shapes_stay_every_size_when_eager_or_as_set() -> None:
    eager = settings_from_mapping({"model": {"compile": "false"}})
    assert eager.batching.batch_sizes == ()
    given = settings_from_mapping({"batching": {"batch_sizes": [3, 8]}})
    assert given.batching.batch_sizes == (3, 8)
