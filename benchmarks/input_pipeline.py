"""Images/s of the grain training pipeline per worker count, beside the train step's consumption rate.

Usage (from the repository root)::

  python -m benchmarks.input_pipeline [--config configs/ml6.py] [--source real|synthetic]
      [--data_dir DIR] [--workers 0,1,2] [--batches 30] [--warmup_batches 8] [--no_train_step]

The pipeline is :func:`imgclf_jax.data.pipeline.train_pipeline` of the config
(attempt 6 by default: every row twice per epoch, rotation +-20 deg, shifts
+-20%, zoom [0.7, 1.3], horizontal flip), iterated as training iterates it,
with ``data.num_workers`` set to each count in ``--workers`` (0 = in the main
process; grain's reading threads always run). Data:

- ``real``: the competition folder ``--data_dir`` (default
  ``../shared/data/deepfake-unibuc``; prepared into array_record files on first
  use, which takes minutes), 100x100 images decoded from the prepared records;
- ``synthetic``: 12,500 random 100x100 RGB images made on the fly (no reading
  or decoding cost; resizing and augmentation as for real data).

Default: real when ``--data_dir`` holds a ``train.csv`` (or is a packed folder), else synthetic (said on stderr).

Prints JSON lines: one ``"benchmark": "input_pipeline"`` row per worker count
(``images_per_s`` over ``--batches`` batches after ``--warmup_batches``, and
``startup_seconds`` to the first batch; the warm-up outlasts grain's prefetch
buffer of 4 batches, so the timed batches are produced while they are timed);
then, unless ``--no_train_step``, the train step's rate for the same config
(a ``benchmarks.train_step`` row of imgclf_jax, measured in a subprocess after
the pipeline runs, so the two do not compete for the CPU); and a ``"part": "summary"`` row with each count's
``pipeline / train step`` ratio and the fewest workers that keep up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

from imgclf_jax import cli
from imgclf_jax.errors import ConfigError

from benchmarks import train_step

FLAGS = {"config": str, "source": str, "data_dir": str, "workers": str, "batches": int,
         "warmup_batches": int, "no_train_step": bool, "image_size": int, "train_steps": int}
SHARED_DATA = train_step.ROOT.parent / "shared" / "data" / "deepfake-unibuc"


@dataclasses.dataclass(frozen=True)
class SyntheticImages:
    """A record source of `size` random RGB images: ``source[i] = {"image": uint8[height, width, 3]}``.

    Each image is drawn from a generator seeded by its index, so any worker
    process makes the same image for the same index.
    """

    size: int = 12_500
    height: int = 100
    width: int = 100

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(int(index))
        return {"image": rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8)}


def synthetic_split(size: int = 12_500, num_classes: int = 5):
    """A training :class:`imgclf_jax.data.splits.Split` over :class:`SyntheticImages`, labels i % classes."""
    from imgclf_jax.data.splits import Split

    return Split(source=SyntheticImages(size), records=np.arange(size, dtype=np.int64),
                 labels=np.arange(size, dtype=np.int64) % num_classes,
                 image_ids=[f"synthetic-{i}" for i in range(size)])


def has_real_data(data_dir: pathlib.Path) -> bool:
    """Whether `data_dir` is a competition folder (it holds ``train.csv``) or a packed one
    (``python -m imgclf_jax.pack read`` wrote it)."""
    from imgclf_jax.data import packed

    return (data_dir / "train.csv").exists() or packed.is_packed(str(data_dir))


def config_and_source(values: dict):
    """(config name, its config with ``--image_size`` applied, data folder, 'real' | 'synthetic' | the
    ``--source`` given) from the parsed flags ``config``, ``image_size``, ``data_dir``, ``source``."""
    config_name = values["config"] or "ml6"
    config = train_step.load_model_config(config_name)
    if values["image_size"]:
        config.data.image_size = values["image_size"]
    data_dir = pathlib.Path(values["data_dir"] or SHARED_DATA)
    return config_name, config, data_dir, values["source"] or ("real" if has_real_data(data_dir) else "synthetic")


def real_split(config, data_dir: pathlib.Path):
    """The training split of the competition folder, or packed folder, `data_dir` (prepared on first use)."""
    from imgclf_jax.data import splits

    if not has_real_data(data_dir):
        raise ConfigError(f"no train.csv (nor a pack's imgclf_pack.json) in {data_dir}; "
                          "pass --data_dir DIR or --source synthetic")
    data = config.data.copy_and_resolve_references()
    data.builder, data.dir = "competition", str(data_dir)
    print(f"input_pipeline: opening {data_dir} (prepared on first use) ...", file=sys.stderr, flush=True)
    return splits.load_run_data(data).train


def pipeline_rate(split, config, workers: int, batches: int, warmup: int) -> dict:
    """Times the training pipeline with `workers` worker processes.

    Returns:
      ``{"workers", "batches", "startup_seconds" (to the first batch), "seconds",
      "images_per_s"}`` over `batches` batches after `warmup` batches.
    """
    from imgclf_jax.data import pipeline

    config = config.copy_and_resolve_references()
    config.data.num_workers = workers
    train = pipeline.train_pipeline(split, config, num_epochs=1)
    needed = 1 + warmup + batches
    if needed > train.steps_per_epoch:
        raise ConfigError(f"--batches + --warmup_batches + 1 = {needed} exceeds one epoch "
                          f"({train.steps_per_epoch} batches)")
    start = time.perf_counter()
    iterator = train.batches(0, needed)
    try:
        next(iterator)
        startup = time.perf_counter() - start
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        images = sum(len(next(iterator)["image"]) for _ in range(batches))
        seconds = time.perf_counter() - start
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    return {"workers": workers, "batches": batches, "startup_seconds": startup, "seconds": seconds,
            "images_per_s": images / seconds}


def main(argv: list[str]) -> int:
    """Runs the benchmark on command-line words `argv` (see the module docstring); returns the exit status."""
    values, _ = cli.parse_flags(argv, FLAGS, config_overrides=False)
    config_name, config, data_dir, source = config_and_source(values)
    if source == "real":
        split = real_split(config, data_dir)
    elif source == "synthetic":
        if not values["source"]:
            print(f"input_pipeline: no real data at {data_dir} (--data_dir DIR); using synthetic images",
                  file=sys.stderr, flush=True)
        split = synthetic_split()
    else:
        raise ConfigError(f"--source must be 'real' or 'synthetic', got {source!r}")
    default_workers = ",".join(str(w) for w in range(min(os.cpu_count() or 1, 4) + 1))
    workers = [int(w) for w in (values["workers"] or default_workers).split(",") if w]
    common = {"benchmark": "input_pipeline", "config": config_name, "source": source,
              "image_size": config.data.image_size, "batch": config.train.batch_size,
              "class_repeats": list(config.data.class_repeats), "augment": config.augment.to_dict()}
    rows = []
    for count in workers:
        print(f"input_pipeline: {count} workers ...", file=sys.stderr, flush=True)
        warmup = 8 if values["warmup_batches"] is None else values["warmup_batches"]
        rows.append({**common, **pipeline_rate(split, config, count, values["batches"] or 30, warmup)})
        print(json.dumps(rows[-1]), flush=True)
    if values["no_train_step"]:
        return 0
    print(f"input_pipeline: the train step of {config_name} ...", file=sys.stderr, flush=True)
    step = train_step.run_row(config_name, "imgclf_jax",
                              {"steps": values["train_steps"], "repeats": 3, "warmup": 1,
                               "image_size": config.data.image_size})
    print(json.dumps({**step, "config": config_name}), flush=True)
    consumed = step.get("images_per_s")
    summary = {"benchmark": "input_pipeline", "part": "summary", "config": config_name, "source": source,
               "train_step_images_per_s": consumed,
               "pipeline_over_train_step": {r["workers"]: r["images_per_s"] / consumed for r in rows}
               if consumed else None,
               "fewest_workers_keeping_up": next((r["workers"] for r in rows if consumed
                                                  and r["images_per_s"] >= consumed), None)}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.input_pipeline")
