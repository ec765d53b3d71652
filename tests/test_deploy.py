"""Deployment files, each checked by its real tool and against the server it deploys.

promtool (rules, rule unit tests, config, every dashboard query), hadolint, kubernetes-validate
and docker-compose run for real; environment variables are validated as settings, and every
metric name in the dashboard, the rules and the adapter config must appear in a real scrape.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import FormData

from batching_server.settings import Settings, SettingsError, settings_from_mapping
from tests.conftest import AppClient
from tests.images import photo_bytes

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "rules").glob("*.test.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "batching_server.json"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
SERVICES = {"batching-server", "prometheus", "jaeger", "grafana"}
GRAFANA_VARIABLES = re.compile(r"\$__(?:rate_interval|interval|range)|\$\{__[a-z_]+\}")


def tool(name: str) -> str:
    """A tool installed in the virtualenv (next to the interpreter) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} not found next to {sys.executable} or on PATH"
    return found


def run(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(name), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def by_kind() -> dict[str, dict[str, Any]]:
    """deploy/k8s objects by kind (one of each)."""
    objects = [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]
    kinds = {obj["kind"]: obj for obj in objects}
    assert len(kinds) == len(objects), "one object of each kind expected"
    return kinds


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """What the server makes of BATCHING_SERVER_<SECTION>__<KEY> variables (values are TOML)."""
    raw: dict[str, dict[str, Any]] = {}
    for name, value in env.items():
        match = re.fullmatch(r"BATCHING_SERVER_([A-Z]+)__([A-Z0-9_]+)", name)
        assert match, f"{name} is not a BATCHING_SERVER_<SECTION>__<KEY> variable"
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = str(value)  # dynaconf keeps what is not TOML as a string
        raw.setdefault(match[1].lower(), {})[match[2].lower()] = parsed
    return settings_from_mapping(raw)


# --- PromQL: queries from every file, and the metric names they use -----------------------

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"')
_NOT_NAMES = re.compile(
    r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions or keywords."""
    expr = _NOT_NAMES.sub(" ", _STRINGS.sub('""', GRAFANA_VARIABLES.sub("5m", expr)))
    return {
        m[0]
        for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr)
        if m[0].lower() not in _KEYWORDS and not expr[m.end() :].lstrip().startswith("(")
    }


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def rules(paths: Iterable[Path]) -> list[dict[str, Any]]:
    return [rule for p in paths for group in load_yaml(p)["groups"] for rule in group["rules"]]


def adapter_rules() -> list[dict[str, Any]]:
    config = by_kind()["ConfigMap"]["data"]["config.yaml"]
    return yaml.safe_load(config)["rules"]


def test_metric_names_finds_metrics_not_functions() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y(z)"}[$__rate_interval])))'
        " / on (job) group_left sum(b_total offset 5m) > bool 1e3 or max(slo:c:ratio_rate5m)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "slo:c:ratio_rate5m"}


def promtool_rule_file(exprs: Iterable[str], path: Path) -> Path:
    """The queries as recording rules, which promtool check rules parses and lints."""
    group = [
        {"record": f"dashboard:query_{i}:check", "expr": GRAFANA_VARIABLES.sub("5m", e)}
        for i, e in enumerate(exprs)
    ]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": group}]}))
    return path


# --- compose.yaml -----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "compose.yaml")


def test_compose_has_the_stack() -> None:
    assert set(compose()["services"]) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_service_is_well_formed(name: str) -> None:
    stack = compose()
    service = stack["services"][name]
    assert "image" in service or "build" in service
    assert service["ports"], f"{name} publishes no port"
    for port in service["ports"]:
        assert isinstance(port, str), f"quote ports: YAML reads 60:60 as a number ({port!r})"
        assert re.fullmatch(r"(?:\d+:)?\d+(?:/(?:tcp|udp))?", port), port
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith(("./", "/")):
            assert (ROOT / source).exists(), f"{name} mounts {source}, not in the repository"
        else:
            assert source in stack.get("volumes", {}), f"{name}: undeclared volume {source}"


def test_compose_server_settings_and_tracing() -> None:
    server = compose()["services"]["batching-server"]
    assert server["build"]["context"] == "."
    assert "/health" in " ".join(server["healthcheck"]["test"])
    mounted = dict(v.split(":")[:2] for v in server["volumes"])
    assert (
        mounted["./settings.toml"] == server["command"][server["command"].index("--settings") + 1]
    )
    assert server["volumes"][0].endswith(":ro")
    settings = settings_from_env(server["environment"])
    assert settings.server.host == "0.0.0.0"
    assert (settings.tracing.exporter, settings.tracing.endpoint) == (
        "otlp-grpc",
        "http://jaeger:4317",
    )
    jaeger_ports = {p.split(":")[-1] for p in compose()["services"]["jaeger"]["ports"]}
    assert {"4317", "4318", "16686"} <= jaeger_ports


def test_settings_from_env_rejects_what_the_server_rejects() -> None:
    with pytest.raises(SettingsError, match=r"batching\.max_batch_sizes"):
        settings_from_env({"BATCHING_SERVER_BATCHING__MAX_BATCH_SIZES": "8"})
    with pytest.raises(AssertionError, match="not a BATCHING_SERVER"):
        settings_from_env({"BATCHING_SERVER_HOST": "0.0.0.0"})


def test_docker_compose_config_accepts_the_stack() -> None:
    result = run("docker-compose", "--file", ROOT / "compose.yaml", "config", "--quiet")
    assert result.returncode == 0, result.stderr


# --- Grafana --------------------------------------------------------------------------------


def test_dashboard_panels_have_titles_and_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel.get("title"), panel
        assert [t["expr"] for t in panel["targets"] if t.get("expr")], panel["title"]
    used = set().union(*map(metric_names, dashboard_queries(dashboard)))
    assert {
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "batch_size_sum",
        "batch_size_bucket",
        "batch_queue_wait_seconds_bucket",
        "model_inference_duration_seconds_bucket",
        "inference_queue_size",
        "batch_dropped_total",
        "image_preprocess_duration_seconds_bucket",
        "slo:availability_errors:ratio_rate1h",
        "slo:latency_errors:ratio_rate1h",
    } <= used
    assert "heatmap" in {panel["type"] for panel in dashboard["panels"]}


def test_grafana_provisioning_matches_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = load_yaml(provisioning / "datasources" / "datasources.yml")["datasources"]
    assert {(s["type"], s["uid"]) for s in sources} == {
        ("prometheus", "prometheus"),
        ("jaeger", "jaeger"),
    }
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels} == {"prometheus"}


def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    result = run("promtool", "check", "rules", promtool_rule_file(queries, tmp_path / "d.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and rejects a broken one, so the check can fail.
    broken = promtool_rule_file([*queries, "sum(rate(x[5m])"], tmp_path / "broken.yml")
    assert run("promtool", "check", "rules", broken).returncode != 0


# --- Prometheus -----------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_config() -> None:
    assert RULES
    for args in (("check", "rules", *RULES), ("check", "config", PROMETHEUS_CONFIG)):
        result = run("promtool", *args)
        assert result.returncode == 0, result.stdout + result.stderr
    # A glob that matches nothing passes promtool: the config must load exactly our rules.
    patterns = load_yaml(PROMETHEUS_CONFIG)["rule_files"]
    loaded = {path for p in patterns for path in PROMETHEUS_CONFIG.parent.glob(p)}
    assert loaded == set(RULES)


def test_rule_unit_tests_pass_and_cover_firing_and_silence() -> None:
    assert RULE_TESTS
    result = run("promtool", "test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [
        case
        for path in RULE_TESTS
        for test in load_yaml(path)["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    assert any(case["exp_alerts"] for case in cases), "no test makes an alert fire"
    assert any(not case["exp_alerts"] for case in cases), "no test keeps an alert silent"
    alerts = {rule["alert"] for rule in rules(RULES) if "alert" in rule}
    assert {case["alertname"] for case in cases if case["exp_alerts"]} >= {
        a for a in alerts if a.endswith("Fast")
    }


def test_latency_slo_uses_a_real_bucket_boundary() -> None:
    from batching_server.observability.metrics import LATENCY_BUCKETS

    exprs = " ".join(rule["expr"] for rule in rules(RULES))
    assert 'le=~"1(\\\\.0)?"' in exprs
    assert 1.0 in LATENCY_BUCKETS


@pytest.fixture
def referenced_metrics() -> set[str]:
    """Every raw metric name the dashboard, the rules and the adapter config query."""
    recorded = {rule["record"] for rule in rules(RULES) if "record" in rule}
    exprs = [
        *dashboard_queries(json.loads(DASHBOARD.read_text())),
        *(rule["expr"] for rule in rules(RULES)),
        *(rule["seriesQuery"] for rule in adapter_rules()),
    ]
    names = set().union(*map(metric_names, exprs)) - recorded
    assert {"http_requests_total", "inference_queue_size", "http_requests_in_flight"} <= names
    return names


async def test_every_queried_metric_is_in_a_real_scrape(
    app_client: AppClient, referenced_metrics: set[str]
) -> None:
    client = await app_client()
    form = FormData()
    form.add_field("file", photo_bytes(), filename="cat.jpg", content_type="image/jpeg")
    assert (await client.post("/predict", data=form)).status == 200
    bad = FormData()
    bad.add_field("file", b"not an image", filename="x.jpg")
    assert (await client.post("/predict", data=bad)).status == 400  # http_errors_total
    body = await (await client.get("/metrics")).text()
    exported = {m[0] for m in re.finditer(r"^[A-Za-z_:][\w:]*", body, re.MULTILINE) if m[0] != "#"}
    assert referenced_metrics - exported == set()
    # The latency SLO counts the le="1.0" bucket, as aioprometheus writes it.
    assert re.search(r'http_request_duration_seconds_bucket\{[^}]*le="1\.0"', body)


# --- Docker image ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(?:\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def test_hadolint_passes() -> None:
    result = run("hadolint", ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_final_stage_and_torch_wheels() -> None:
    *_, builder, final = dockerfile_stages()
    facts = dict(final)
    assert "python:3.11-slim" in dict(dockerfile_stages()[0])["ARG"]
    defaults = dict(a.partition("=")[::2] for i, a in final if i == "ARG")
    user = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], facts["USER"]).split(":")[0]
    assert user
    assert user not in {"root", "0"}
    assert "python" in facts["HEALTHCHECK"]
    assert "/health" in facts["HEALTHCHECK"]
    assert facts["EXPOSE"] == "8080"
    assert "BATCHING_SERVER_SERVER__HOST=0.0.0.0" in facts["ENV"]
    build = " ".join(args for _, args in builder)
    assert "https://download.pytorch.org/whl/cpu" in build
    assert "BAKE_WEIGHTS" in build
    assert "TORCH_HOME" in build
    assert "TORCH_HOME" in facts["ENV"]
    # The wheels the image installs are the ones the package pins.
    pins = set(re.findall(r"(torch(?:vision)?==[\w.]+)", (ROOT / "setup.cfg").read_text()))
    assert pins
    assert pins <= set(shlex.split(build))


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "benchmarks/results"} <= ignored
    copied = {
        source
        for stage in dockerfile_stages()
        for instruction, args in stage
        if instruction == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    }
    assert copied
    assert copied.isdisjoint(ignored)


# --- Kubernetes -----------------------------------------------------------------------------


def test_kubernetes_validate_strict() -> None:
    assert K8S
    result = run("kubernetes-validate", "--strict", *K8S)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployment_probes_and_shutdown_timing() -> None:
    objects = by_kind()
    pod = objects["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {
        kind: (container[kind]["httpGet"]["path"], ports[container[kind]["httpGet"]["port"]])
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes == {
        "livenessProbe": ("/health", 8080),
        "readinessProbe": ("/ready", 8080),
        "startupProbe": ("/health", 8080),
    }
    settings = settings_from_env({e["name"]: e["value"] for e in container["env"]})
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8080)
    sleep_cmd = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_cmd[0] == "sleep"
    drain = int(sleep_cmd[1]) + settings.server.graceful_shutdown_timeout_s
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    # Prometheus scrapes the metrics port the server is told to open, which the Service
    # does not publish.
    assert int(annotations["prometheus.io/port"]) == settings.metrics.port == ports["metrics"]
    service_ports = {p["targetPort"] for p in objects["Service"]["spec"]["ports"]}
    assert "metrics" not in service_ports
    assert settings.metrics.port not in service_ports
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in {v["name"]: v for v in pod["spec"]["volumes"]}[mounts["/tmp"]]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_service_pdb_and_hpa_point_at_the_deployment() -> None:
    objects = by_kind()
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metrics = hpa["spec"]["metrics"]
    pods = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert "inference_queue_size" in pods
    assert pods <= served
    assert {m["resource"]["name"] for m in metrics if m["type"] == "Resource"} == {"cpu"}
