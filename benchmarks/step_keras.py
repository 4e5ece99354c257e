"""One train-step measurement of the Keras 3 twin of a config, on the backend ``KERAS_BACKEND`` names.

Keras trains as the notebooks trained: ``model.fit`` over a
``keras.utils.PyDataset`` that hands it a fixed host batch per step (the same
synthetic batch as :mod:`benchmarks.step_imgclf`, labels one-hot for
categorical cross-entropy), with Keras's default ``jit_compile``. A first
``fit`` of one step compiles, a second runs the warm-up steps, and a third
times ``repeats`` epochs of ``steps`` steps each with a callback; each epoch's
time ends once its last step's loss is on the host.

Run it in a process of its own: Keras fixes its backend on import.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from benchmarks import measure
from benchmarks.step_imgclf import steps_for, synthetic_batch

BACKENDS = ("tensorflow", "jax")


class SkipRow(Exception):
    """The row cannot run here (a package is missing); the message says why and what to install."""


def _import_keras(backend: str):
    if os.environ.get("KERAS_BACKEND") != backend:
        raise RuntimeError(f"KERAS_BACKEND must be {backend!r} before Keras is imported "
                           f"(got {os.environ.get('KERAS_BACKEND')!r})")
    if backend == "tensorflow":
        try:
            import tensorflow  # noqa: F401  (Keras's own message for a missing backend is vaguer)
        except ImportError as e:
            raise SkipRow(f"tensorflow is not installed ({e}); pip install '.[bench]'") from None
    try:
        import keras
    except ImportError as e:
        raise SkipRow(f"keras is not installed ({e}); pip install '.[bench]'") from None
    if keras.backend.backend() != backend:
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}, not {backend!r}")
    return keras


def _device(backend: str) -> tuple[str, str, int, int | None]:
    """(backend kind, device kind, device count, peak device bytes or None) of the Keras backend."""
    if backend == "jax":
        import jax

        devices = jax.local_devices()
        return jax.default_backend(), devices[0].device_kind, 1, measure.jax_device_peak_bytes()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu", "cpu", 1, None
    details = tf.config.experimental.get_device_details(gpus[0])
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    return "gpu", details.get("device_name", "GPU"), 1, int(peak)


def measure_train_step(config: Any, num_classes: int, image_size: int, batch: int, steps: int | None,
                       repeats: int, warmup: int, repeat_seconds: float, backend: str) -> dict:
    """Times the Keras twin's train step; returns the measured fields of a train_step row.

    Arguments and returned keys as :func:`benchmarks.step_imgclf.measure_train_step`, plus
    ``backend`` ('tensorflow' or 'jax', which must equal ``KERAS_BACKEND``) and the
    returned ``jit_compile`` (what Keras's 'auto' resolved to).

    Raises:
      SkipRow: keras (or tensorflow for that backend) is not installed.
    """
    keras = _import_keras(backend)
    from benchmarks import keras_models

    rss_imports = measure.host_rss_bytes()
    keras.utils.set_random_seed(config.seed)
    model = keras_models.build_compiled(config, num_classes, image_size)
    data = synthetic_batch(batch, image_size, num_classes)
    x, y = data["image"], np.eye(num_classes, dtype=np.float32)[data["label"]]

    class Batches(keras.utils.PyDataset):
        """`length` copies of the fixed batch."""

        def __init__(self, length: int):
            super().__init__()
            self.length = length

        def __len__(self):
            return self.length

        def __getitem__(self, index):
            return x, y

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self.losses, self._start = [], [], 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.losses.append(float(logs["loss"]))  # waits for the epoch's last step
            self.seconds.append(time.perf_counter() - self._start)

    start = time.perf_counter()
    model.fit(Batches(1), epochs=1, verbose=0, shuffle=False)
    compile_seconds = time.perf_counter() - start
    if warmup:
        timer = EpochTimer()
        model.fit(Batches(warmup), epochs=1, verbose=0, shuffle=False, callbacks=[timer])
        seconds_per_step = timer.seconds[0] / warmup
    else:
        seconds_per_step = compile_seconds
    if steps is None:
        steps = steps_for(seconds_per_step, repeat_seconds)
    timer = EpochTimer()
    model.fit(Batches(steps), epochs=repeats, verbose=0, shuffle=False, callbacks=[timer])
    rates = measure.rate(steps * batch, timer.seconds)
    kind, device, count, peak = _device(backend)
    versions = {"keras": keras.__version__}
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    else:
        import jax

        versions["jax"] = jax.__version__
    return {
        "backend": kind, "device": device, "device_count": count,
        "params": int(model.count_params()),
        "compile_seconds": compile_seconds,
        "steps": steps, "repeats": repeats, "warmup_steps": warmup,
        "repeat_seconds": timer.seconds,
        "images_per_s": rates["median"], "images_per_s_min": rates["min"], "images_per_s_max": rates["max"],
        "final_loss": timer.losses[-1],
        "jit_compile": bool(model.jit_compile),
        "host_rss_after_imports_bytes": rss_imports,
        "host_peak_rss_bytes": measure.host_peak_rss_bytes(),
        "device_peak_bytes": peak,
        "versions": versions,
    }
