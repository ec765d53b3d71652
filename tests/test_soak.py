"""The soak benchmark, short: a minute of steady load on a real server, no 5xx, bounded RSS."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # server start, 10 s of calibration and 60 s of load take about 90 s
DURATION_S, WARMUP_S, INTERVAL_S = 60, 20, 5
MAX_RSS_GROWTH_MB = 50  # the bound for the 10-minute run
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_soak(tmp_path: Path) -> tuple[int, str]:
    """Exit status and output of ``python -m benchmarks.soak``; its own process group, so a
    timeout kills the server it started too."""
    argv = [
        sys.executable, "-m", "benchmarks.soak",
        "--duration", str(DURATION_S), "--warmup-s", str(WARMUP_S),
        "--interval", str(INTERVAL_S), "--calibrations", "1", "--calibrate-s", "10",
        # 40%, not the 70% of the long run: this kind of 2-core machine slows by up to ~1.8x
        # for minutes at a time (measured here), so 70% of a capacity calibrated in a fast
        # minute can exceed what a slow one serves, and the bounded queue then answers 503
        # by design (the 10-minute run saw 16 such). The 503 path has its own tests.
        "--load-fraction", "0.4",
        "--max-rss-growth-mb", str(MAX_RSS_GROWTH_MB),
        # No compile: its warm-up would take longer than the soak itself.
        "--set", "model.compile=false",
        "--out", str(tmp_path / "soak.json"), "--plot", str(tmp_path / "soak.png"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHING_SERVER")}
    with subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as soak:
        try:
            output, _ = soak.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(soak.pid, signal.SIGKILL)
            output, _ = soak.communicate()
            pytest.fail(f"the soak ran past {TIMEOUT_S} s:\n{output}")
    return soak.returncode, output


@pytest.mark.slow
def test_a_minute_of_steady_load_has_no_errors_and_bounded_rss(tmp_path: Path) -> None:
    returncode, output = run_soak(tmp_path)
    assert (tmp_path / "soak.json").exists(), output
    payload = json.loads((tmp_path / "soak.json").read_text())
    summary, windows = payload["summary"], payload["windows"]

    assert summary["5xx"] == 0, summary["errors"]
    assert summary["4xx"] == 0, summary["errors"]
    assert summary["client_errors"] == 0, summary["errors"]
    assert payload["rate"] > 0
    # Every request sent was answered 200, and there were enough of them to mean something:
    # about what the calibrated rate plans (a Poisson count; a slower machine plans fewer),
    # and at least one a second.
    assert summary["2xx"] == summary["sent"]
    assert summary["sent"] >= max(DURATION_S, 0.8 * payload["rate"] * DURATION_S)
    assert len(windows) == DURATION_S // INTERVAL_S
    assert summary["post_warmup_windows"] == (DURATION_S - WARMUP_S) // INTERVAL_S
    assert all(window["sent"] > 0 for window in windows)
    # The server has torch and ResNet-50 loaded: anything under 100 MB is not its RSS.
    rss = [summary["rss_start_mb"], *(window["rss_mb"] for window in windows)]
    assert all(math.isfinite(value) and value > 100 for value in rss), rss
    assert summary["rss_warmup_end_t_s"] == WARMUP_S
    assert summary["rss_growth_mb"] < MAX_RSS_GROWTH_MB, rss
    assert math.isfinite(summary["rss_slope_mb_per_min"])
    assert math.isfinite(summary["p99_first_ms"])
    assert math.isfinite(summary["p99_last_ms"])
    assert payload["failures"] == []
    assert returncode == 0, output

    assert (tmp_path / "soak.png").read_bytes().startswith(PNG_SIGNATURE)
