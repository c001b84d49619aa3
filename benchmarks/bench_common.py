"""Helpers the benchmark scripts share: peak memory of this process and a per-call timer.

Plain Python (no JAX, no torch), so that scripts running in other virtual environments
(benchmarks/peers.py) can import it too. Scripts run as ``python benchmarks/<name>.py``, which
puts this folder on ``sys.path``.
"""

from __future__ import annotations

import time


def peak_rss_gib() -> float:
    """This process's peak resident set size (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("VmHWM not found in /proc/self/status")


def timed(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` (which blocks until its result is ready), after a warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats
