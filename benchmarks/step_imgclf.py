"""One train-step measurement of imgclf_jax: the jitted step of ``imgclf_jax.steps`` on a synthetic batch.

The step is the one training runs (:func:`imgclf_jax.steps.jit_train_step`
over :func:`imgclf_jax.parallel.make_mesh`), fed as the training loop feeds
it: each step places the host batch on the mesh
(:func:`imgclf_jax.parallel.shard_batch`) and dispatches without waiting; a
timed block of steps ends when the last state is ready. The batch is fixed
random data (float32 images in [0, 1), random labels, no padding), so the
input pipeline is not measured here (see :mod:`benchmarks.input_pipeline`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from benchmarks import measure


def synthetic_batch(batch: int, image_size: int, num_classes: int, seed: int = 0) -> dict:
    """A fixed training batch as the pipeline yields it.

    Returns:
      ``{"image": float32[B, S, S, 3] in [0, 1), "label": int32[B], "mask": bool[B] (all True)}``.
    """
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((batch, image_size, image_size, 3), dtype=np.float32),
        "label": rng.integers(0, num_classes, batch).astype(np.int32),
        "mask": np.ones(batch, bool),
    }


def steps_for(seconds_per_step: float, repeat_seconds: float, minimum: int = 2) -> int:
    """Steps per timed repeat so that a repeat lasts about `repeat_seconds` (at least `minimum`)."""
    return max(minimum, math.ceil(repeat_seconds / max(seconds_per_step, 1e-9)))


def measure_train_step(config: Any, num_classes: int, image_size: int, batch: int, steps: int | None,
                       repeats: int, warmup: int, repeat_seconds: float) -> dict:
    """Times imgclf_jax's train step; returns the measured fields of a train_step row.

    Args:
      config: a run config (model, optimizer, seed are used).
      num_classes, image_size, batch: the problem (images are image_size^2 x 3).
      steps: steps per timed repeat; None picks :func:`steps_for` from the warm-up's speed.
      repeats: timed repeats (the median is reported).
      warmup: steps run after the compiling step and before timing.
      repeat_seconds: the target length of a repeat when `steps` is None.

    Returns:
      A dict: backend, device, device_count, params, compile_seconds, steps, repeats,
      warmup_steps, repeat_seconds (list), images_per_s (+ _min, _max), final_loss,
      host_rss_after_imports_bytes, host_peak_rss_bytes, device_peak_bytes, versions.
    """
    import flax
    import jax
    import optax

    from imgclf_jax import parallel
    from imgclf_jax import steps as steps_lib
    from imgclf_jax.models import create_model
    from imgclf_jax.optim import create_optimizer_for_shapes

    rss_imports = measure.host_rss_bytes()
    model = create_model(config.model, num_classes)
    tx = create_optimizer_for_shapes(config.optimizer, config.train.num_epochs)
    mesh = parallel.make_mesh(batch)
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    ema_decay = config.train.ema_decay
    make_state = jax.jit(lambda key: steps_lib.create_train_state(model, tx, key, image_size, ema_decay),
                         out_shardings=parallel.replicated(mesh))
    state = make_state(init_key)
    # The step training runs: the config's loss (label smoothing), batch transform (MixUp/CutMix) and EMA.
    loss_fn, batch_transform, _ = steps_lib.recipe_hooks(config, num_classes)
    train_step = steps_lib.jit_train_step(model, tx, config.model.l2, mesh, loss_fn=loss_fn,
                                          batch_transform=batch_transform, ema_decay=ema_decay)
    host_batch = synthetic_batch(batch, image_size, num_classes)
    metrics = None

    def run(n: int) -> None:
        nonlocal state, metrics
        for _ in range(n):
            state, metrics = train_step(state, parallel.shard_batch(host_batch, mesh), dropout_key)
        jax.block_until_ready((state, metrics))

    start = time.perf_counter()
    run(1)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run(warmup)
    if steps is None:
        steps = steps_for((time.perf_counter() - start) / max(warmup, 1), repeat_seconds)
    seconds = measure.time_repeats(lambda: run(steps), repeats)
    rates = measure.rate(steps * batch, seconds)
    devices = mesh.devices.flatten()
    return {
        "backend": jax.default_backend(),
        "fast_path": getattr(model, "fast_path", False),  # CPU fast path in use (models without one: False)
        "device": devices[0].device_kind,
        "device_count": len(devices),
        "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
        "compile_seconds": compile_seconds,
        "steps": steps, "repeats": repeats, "warmup_steps": warmup,
        "repeat_seconds": seconds,
        "images_per_s": rates["median"], "images_per_s_min": rates["min"], "images_per_s_max": rates["max"],
        "final_loss": float(metrics["loss_sum"] / metrics["count"]),
        "host_rss_after_imports_bytes": rss_imports,
        "host_peak_rss_bytes": measure.host_peak_rss_bytes(),
        "device_peak_bytes": measure.jax_device_peak_bytes(),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    }
