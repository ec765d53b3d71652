"""Forensic probes that only the benchmarks use, checked against the kernel's own accounting."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from benchmarks._common import thread_cpu_wait_s

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="schedstat is Linux's")


def test_thread_cpu_wait_reads_the_wait_for_a_core_not_the_time_on_it() -> None:
    # This thread and a nice-10 busy process share one core: this thread, always runnable,
    # is either on the core or waiting for it, and gets about ten elevenths of it.
    core = min(os.sched_getaffinity(0))
    me = threading.get_native_id()
    hog_code = (
        f"import os, time\nos.sched_setaffinity(0, {{{core}}})\nos.nice(10)\n"
        "print(flush=True)\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"
    )
    previous = os.sched_getaffinity(me)
    with subprocess.Popen([sys.executable, "-c", hog_code], stdout=subprocess.PIPE) as hog:
        try:
            assert hog.stdout is not None
            hog.stdout.readline()  # it is pinned and about to spin
            os.sched_setaffinity(me, {core})
            waited_before = thread_cpu_wait_s(os.getpid(), me)
            assert waited_before is not None
            wall, cpu = time.monotonic(), time.thread_time()
            while time.monotonic() - wall < 0.5:
                pass
            wall = time.monotonic() - wall
            cpu = time.thread_time() - cpu
            waited_after = thread_cpu_wait_s(os.getpid(), me)
            assert waited_after is not None
            waited = waited_after - waited_before
        finally:
            os.sched_setaffinity(me, previous)
            hog.kill()
    assert 0 < waited < wall / 2  # the time on the core would be most of it
    assert waited == pytest.approx(wall - cpu, abs=0.1)
