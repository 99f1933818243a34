"""Steady timings for `python -m luong` and `benches/compare.py`: what the machine is, when the
other library's threads have gone quiet, and medians of calls back to back.

Two libraries in one process share the cores. NumPy's OpenBLAS workers spin for about 0.1 s of
CPU after every matmul (OpenBLAS's default thread timeout), and on a 2-core machine that spin
takes the core luong's second thread needs: timed right after NumPy, a luong call runs on one
core. So each side is timed only once the process has stopped burning CPU while asleep.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def wait_until_idle(timeout: float = 1.0, step: float = 0.01) -> float:
    """Sleeps in `step`s until the process burns under a fifth of a core while asleep (no
    worker thread of any library left spinning), or `timeout` passes. Returns the seconds
    waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        cpu = time.process_time()
        time.sleep(step)
        if time.process_time() - cpu < step / 5:
            break
    return time.perf_counter() - start


def steady_ms(fn: Callable[[], Any], calls: int, warm: int = 2) -> float:
    """Median milliseconds of `calls` calls back to back, after `warm` untimed ones, started
    once no other library's workers are spinning: a program calling `fn` in a loop."""
    wait_until_idle()
    for _ in range(warm):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)
