"""Timing and memory measurements shared by the benchmarks (no framework imported here).

Rates are medians over repeats: each repeat times a block of work that ends
with the results on the host or ready on the device, so asynchronous dispatch
cannot hide work, and the median keeps one disturbed repeat on a shared
machine from moving the figure.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from typing import Callable


def time_repeats(run_block: Callable[[], None], repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of ``run_block()``, each timed on its own.

    ``run_block`` must return only once its work has finished (block on the device).
    """
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_block()
        seconds.append(time.perf_counter() - start)
    return seconds


def rate(items_per_repeat: int, seconds: list[float]) -> dict:
    """Items per second from repeat timings: the median, and the slowest and fastest repeat.

    Returns:
      ``{"median": items/s, "min": items/s, "max": items/s}`` (floats).
    """
    rates = [items_per_repeat / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, bytes (``getrusage`` ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


def host_rss_bytes() -> int | None:
    """Current resident set size of this process, bytes (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def jax_device_peak_bytes() -> int | None:
    """Peak bytes in use on JAX's first local device, where the backend reports it (GPU, TPU).

    The CPU backend reports no memory statistics: None.
    """
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def seconds_per_call(call: Callable[[], object], repeats: int = 5, target_seconds: float = 0.2) -> dict:
    """Median wall-clock seconds of one ``call()``, which must block until its result is ready.

    The first call (compilation) is not timed. A repeat makes enough calls to
    last about `target_seconds` (so millisecond kernels on an accelerator are
    not lost in timer noise) and counts its mean.

    Returns:
      ``{"seconds": median s per call, "seconds_min": fastest repeat's s per call,
      "calls_per_repeat": n, "first_call_seconds": s of the untimed first call}``.
    """
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    once = min(time_repeats(call, 2))
    per_repeat = max(1, int(target_seconds / max(once, 1e-9)))

    def block():
        for _ in range(per_repeat):
            call()

    seconds = [s / per_repeat for s in time_repeats(block, repeats)]
    return {"seconds": statistics.median(seconds), "seconds_min": min(seconds),
            "calls_per_repeat": per_repeat, "first_call_seconds": first}
