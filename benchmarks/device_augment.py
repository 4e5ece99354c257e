"""Images/s of the training batches with augmentation on the host, on the device, and with the split on the device.

Usage (from the repository root)::

  python -m benchmarks.device_augment [--config configs/ml6.py] [--source real|synthetic]
      [--data_dir DIR] [--batches 30] [--warmup_batches 4] [--image_size S] [--train_examples N]
      [--ways host,device,on_device]

Three ways to make the same batches of the config's training pipeline (attempt 6 by default:
rotation +-20 deg, shifts +-20%, zoom [0.7, 1.3], flip, at data.image_size), side by side
in one process, each timed until its batch is on the device and ready for the train step:

- ``host``: ``data.augment_on='host'``: grain decodes, resizes and warps with scipy (its
  reading threads; ``data.num_workers=0``), then ``jax.device_put`` of ``float32[B, S, S, 3]``;
- ``device``: ``data.augment_on='device'``: grain decodes and resizes and draws the
  parameters; ``uint8`` pixels go to the device, which warps (:mod:`imgclf_jax.data.device_augment`);
- ``on_device``: ``data.on_device=true``: the split is in device memory (loaded before timing),
  grain only draws; the device gathers and warps.

Prints one JSON line per way (``images_per_s`` over ``--batches`` batches after
``--warmup_batches``, the first batch's compile excluded) and a ``"part": "summary"`` line with
each way's ratio to ``host`` and the fastest way, which is what ``data.augment_on='auto'``
should pick on that backend (:mod:`imgclf_jax.data.placement`). Data as
``benchmarks.input_pipeline``: ``real`` (the competition folder, default when present) or
``synthetic`` (random 100x100 images).
"""

from __future__ import annotations

import json
import sys
import time

from imgclf_jax import cli
from imgclf_jax.errors import ConfigError

from benchmarks import input_pipeline

FLAGS = {"config": str, "source": str, "data_dir": str, "batches": int, "warmup_batches": int,
         "image_size": int, "train_examples": int, "ways": str}
WAYS = ("host", "device", "on_device")


def way_rate(split, config, way: str, batches: int, warmup: int) -> dict:
    """Times `batches` training batches made `way` (module docstring), after `warmup` untimed ones.

    Returns ``{"way", "augment_on", "on_device", "batches", "seconds", "images_per_s", "setup_seconds"}``
    (setup: building the pipeline and, for ``on_device``, loading the split into device memory).
    """
    import jax

    from imgclf_jax import parallel
    from imgclf_jax.data import device_augment, pipeline

    if way not in WAYS:
        raise ConfigError(f"--ways: unknown way {way!r}; choose from {', '.join(WAYS)}")
    config = config.copy_and_resolve_references()
    config.data.num_workers = 0
    config.data.on_device = way == "on_device"
    config.data.augment_on = "host" if way == "host" else "device"
    start = time.perf_counter()
    train = pipeline.train_pipeline(split, config, num_epochs=1)
    mesh = parallel.make_mesh(config.train.batch_size)
    stage = device_augment.stage_for(train, split, config, mesh)
    setup = time.perf_counter() - start
    needed = 1 + warmup + batches
    if needed > train.steps_per_epoch:
        raise ConfigError(f"--batches + --warmup_batches + 1 = {needed} exceeds one epoch "
                          f"({train.steps_per_epoch} batches)")

    def make(batch):
        batch = parallel.shard_batch(batch, mesh)
        batch = stage(batch) if stage is not None else batch
        return jax.block_until_ready(batch)

    iterator = train.batches(0, needed)
    try:
        make(next(iterator))  # compiles the device stage
        for _ in range(warmup):
            make(next(iterator))
        start = time.perf_counter()
        images = sum(int(make(next(iterator))["mask"].shape[0]) for _ in range(batches))
        seconds = time.perf_counter() - start
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    return {"way": way, "augment_on": train.augment_on, "on_device": train.on_device, "batches": batches,
            "seconds": seconds, "images_per_s": images / seconds, "setup_seconds": setup}


def main(argv: list[str]) -> int:
    """Runs the benchmark on command-line words `argv` (see the module docstring); returns the exit status."""
    import jax

    values, _ = cli.parse_flags(argv, FLAGS, config_overrides=False)
    config_name, config, data_dir, source = input_pipeline.config_and_source(values)
    size = values["train_examples"] or 0
    if source == "real":
        if size:
            config.data.max_train_examples = size
        split = input_pipeline.real_split(config, data_dir)
    elif source == "synthetic":
        split = input_pipeline.synthetic_split(size or 12_500)
    else:
        raise ConfigError(f"--source must be 'real' or 'synthetic', got {source!r}")
    ways = [w for w in (values["ways"] or ",".join(WAYS)).split(",") if w]
    unknown = [w for w in ways if w not in WAYS]
    if unknown:  # refused before any way runs
        raise ConfigError(f"--ways: unknown way(s) {', '.join(unknown)}; choose from {', '.join(WAYS)}")
    common = {"benchmark": "device_augment", "config": config_name, "source": source,
              "backend": jax.default_backend(), "devices": jax.device_count(),
              "image_size": config.data.image_size, "batch": config.train.batch_size,
              "train_examples": len(split), "augment": config.augment.to_dict()}
    warmup = 4 if values["warmup_batches"] is None else values["warmup_batches"]
    rows = []
    for way in ways:
        print(f"device_augment: {way} ...", file=sys.stderr, flush=True)
        rows.append({**common, **way_rate(split, config, way, values["batches"] or 30, warmup)})
        print(json.dumps(rows[-1]), flush=True)
    rates = {r["way"]: r["images_per_s"] for r in rows}
    summary = {"benchmark": "device_augment", "part": "summary", "config": config_name, "source": source,
               "backend": common["backend"], "images_per_s": rates,
               "over_host": {w: v / rates["host"] for w, v in rates.items()} if "host" in rates else None,
               "fastest": max(rates, key=rates.get) if rates else None}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.device_augment")
