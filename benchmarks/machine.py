"""The machine probe: what the hardware is, and the GFLOP/s of a large float32 matmul under JAX.

Usage::

  python -m benchmarks.machine [--matmul_size N] [--repeats R]

prints one JSON line::

  {"benchmark": "machine", "matmul_gflops_per_s": G, "matmul_size": N, "backend": "cpu", ...}

The matmul is ``jnp.matmul`` of two float32[N, N] arrays, jit-compiled, with
JAX's default precision (the precision the train step runs at; on recent
NVIDIA GPUs that default may use TF32 for float32), 2 N^3 FLOPs each. A
repeat runs enough matmuls back to back to last about 0.2 s; the figure is the
median over repeats. It stands for what the machine can do on dense float32
work, so ``train GFLOP/s / matmul GFLOP/s`` says what fraction of it a train
step uses. N defaults to 2048 on CPU (17 GFLOP a matmul) and 8192 on
accelerators.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform

from benchmarks import measure
from imgclf_jax import cli

DEFAULT_SIZE = {"cpu": 2048}
ACCELERATOR_SIZE = 8192
BLOCK_SECONDS = 0.2  # target duration of one timed repeat


def matmul_gflops(size: int | None = None, repeats: int = 5) -> dict:
    """Measures float32 matmul throughput on JAX's default device.

    Args:
      size: N of the N x N matrices (None: 2048 on CPU, 8192 elsewhere).
      repeats: timed repeats; the median is reported.

    Returns:
      ``{"matmul_gflops_per_s": median GFLOP/s (float), "matmul_gflops_min", "matmul_gflops_max",
      "matmul_size": N, "matmul_per_repeat": matmuls per repeat}``.
    """
    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    n = int(size or DEFAULT_SIZE.get(backend, ACCELERATOR_SIZE))
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile
    once = min(measure.time_repeats(lambda: matmul(a, b).block_until_ready(), 2))
    per_repeat = max(1, math.ceil(BLOCK_SECONDS / max(once, 1e-6)))

    def block():
        out = None
        for _ in range(per_repeat):
            out = matmul(a, b)
        out.block_until_ready()  # one stream: the last finishing means all have

    seconds = measure.time_repeats(block, repeats)
    gflops = measure.rate(2 * n ** 3 * per_repeat / 1e9, seconds)
    return {"matmul_gflops_per_s": gflops["median"], "matmul_gflops_min": gflops["min"],
            "matmul_gflops_max": gflops["max"], "matmul_size": n, "matmul_per_repeat": per_repeat}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def describe() -> dict:
    """The hardware and software a benchmark ran on (a JSON-ready dict).

    Keys: date (UTC, ISO 8601), cpu, cpu_count (logical CPUs this process may use),
    host_memory_bytes, python, backend (JAX's default: 'cpu', 'gpu', 'tpu'),
    devices (JAX device kinds), device_count, and the versions of jax, jaxlib, flax, optax.
    """
    import jax

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    devices = jax.devices()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": cpus,
        "host_memory_bytes": _host_memory_bytes(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": sorted({d.device_kind for d in devices}),
        "device_count": len(devices),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def main(argv: list[str]) -> int:
    """Prints the machine line (see the module docstring); returns the exit status."""
    values, _ = cli.parse_flags(argv, {"matmul_size": int, "repeats": int}, config_overrides=False)
    row = {"benchmark": "machine", **describe(),
           **matmul_gflops(values["matmul_size"], values["repeats"] or 5)}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.machine")
