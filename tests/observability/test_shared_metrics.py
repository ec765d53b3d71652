"""Metrics of several worker processes: written through to files, summed at scrape time."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batching_server.observability.metrics import ServiceMetrics
from batching_server.observability.shared_metrics import (
    MetricFiles,
    SharedCounter,
    SharedGauge,
    SharedHistogram,
    forget_process,
    render_fleet,
)

OPEN: list[MetricFiles] = []


@pytest.fixture(autouse=True)
def _close_files() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def worker_metrics(directory: Path, worker: int, life: str) -> ServiceMetrics:
    files = MetricFiles(directory=directory, process_id=f"{worker}-{life}", worker_id=str(worker))
    OPEN.append(files)
    metrics = ServiceMetrics(model_name="resnet18", max_batch_size=2, files=files)
    metrics.describe_model(weights="random", device="cpu", precision="fp32", parameter_bytes=10)
    return metrics


def answered(metrics: ServiceMetrics, count: int, *, seconds: float = 0.02) -> None:
    for _ in range(count):
        metrics.observe_request(
            method="POST", endpoint="/predict", status=200, seconds=seconds, error_type=None
        )


def samples(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = render_fleet(directory).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


PREDICT = (("endpoint", "/predict"), ("method", "POST"), ("status", "2xx"))


def test_counters_and_histograms_are_summed_over_workers(tmp_path: Path) -> None:
    first, second = worker_metrics(tmp_path, 0, "a"), worker_metrics(tmp_path, 1, "b")
    answered(first, 3, seconds=0.02)
    answered(second, 2, seconds=3.0)
    found = samples(tmp_path)
    assert found[("http_requests_total", PREDICT)] == 5
    assert found[("http_request_duration_seconds_count", PREDICT)] == 5
    assert found[("http_request_duration_seconds_sum", PREDICT)] == pytest.approx(6.06)
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in found.items()
        if name == "http_request_duration_seconds_bucket"
    }
    # Cumulative, with every bucket present (zero below the first observation).
    assert buckets["0.005"] == 0
    assert buckets["0.025"] == 3
    assert buckets["2.5"] == 3
    assert buckets["5.0"] == 5
    assert buckets["+Inf"] == 5


def test_a_dead_workers_counts_stay_and_its_gauges_go(tmp_path: Path) -> None:
    dead = worker_metrics(tmp_path, 0, "first-life")
    survivor = worker_metrics(tmp_path, 1, "b")
    answered(dead, 4)
    answered(survivor, 1)
    dead.in_flight.set({}, 2)
    survivor.in_flight.set({}, 1)
    assert samples(tmp_path)[("http_requests_in_flight", ())] == 3  # a total: summed
    forget_process(tmp_path, "0")  # the supervisor saw worker 0 die
    found = samples(tmp_path)
    assert found[("http_requests_in_flight", ())] == 1  # the survivor's alone
    assert found[("http_requests_total", PREDICT)] == 5  # the dead one's 4 still count
    assert [dict(labels)["worker"] for name, labels in found if name == "model_info"] == ["1"]
    replacement = worker_metrics(tmp_path, 0, "second-life")
    answered(replacement, 1)
    found = samples(tmp_path)
    assert found[("http_requests_total", PREDICT)] == 6  # 4 + 1 + 1: never backwards
    assert found[("http_requests_in_flight", ())] == 1  # the replacement's 0 + the survivor's
    infos = [labels for name, labels in found if name == "model_info"]
    assert sorted(dict(labels)["worker"] for labels in infos) == ["0", "1"]


def test_every_change_reaches_the_files_before_any_scrape(tmp_path: Path) -> None:
    """A worker killed between two scrapes has already written all it counted."""
    metrics = worker_metrics(tmp_path, 0, "a")
    answered(metrics, 2)
    metrics.on_drop("expired", 3)
    # No render() of this worker ever ran: another process reads the files alone.
    found = samples(tmp_path)
    assert found[("http_requests_total", PREDICT)] == 2
    assert found[("batch_dropped_total", (("reason", "expired"),))] == 3


def test_a_workers_scrape_answers_for_the_fleet(tmp_path: Path) -> None:
    scraped, other = worker_metrics(tmp_path, 0, "a"), worker_metrics(tmp_path, 1, "b")
    answered(other, 7)
    body, headers = scraped.render([])
    assert headers["Content-Type"].startswith("text/plain")
    assert 'http_requests_total{endpoint="/predict",method="POST",status="2xx"} 7.0' in (
        body.decode()
    )


def test_single_process_metrics_write_no_files() -> None:
    metrics = ServiceMetrics(model_name="resnet18", max_batch_size=2)
    answered(metrics, 1)
    body, _ = metrics.render([])
    assert b"http_requests_total" in body
    shared = (SharedCounter, SharedGauge, SharedHistogram)
    assert metrics.registry.collectors
    assert not [c for c in metrics.registry.collectors.values() if isinstance(c, shared)]


@pytest.mark.parametrize("bad", ["", "a_b", "a/b"])
def test_ids_that_would_break_the_file_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="without '_' or '/'"):
        MetricFiles(directory=tmp_path, process_id=bad, worker_id="0")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_merged_exposition(tmp_path: Path) -> None:
    for worker in (0, 1):
        metrics = worker_metrics(tmp_path, worker, "a")
        answered(metrics, 2)
        metrics.on_drop("cancelled", 1)
        metrics.preprocess_duration.add({}, 0.003)
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=render_fleet(tmp_path),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""
