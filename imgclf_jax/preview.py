"""See what the model will see: a grid of training images after resampling and augmentation.

Usage::

  python -m imgclf_jax.preview --config configs/ml6.py [--out grid.png | --workdir DIR] \
      [--config.data.dir=...] [--epoch 1] [--num_images 32]

The grid goes to ``--out``, or else to ``preview.png`` in the workdir
(``--workdir``, default ``runs/NAME``); giving both is refused.

Writes a PNG grid of the first `num_images` real rows of the given training
epoch (1-based, as in history.json), each titled with its class name, exactly as the training
pipeline yields them (resampled, shuffled, augmented, scaled to [0, 1]; with
per-channel normalization on, ``data.channel_mean`` / ``channel_std``, it is
undone for display, x * std + mean); and prints the per-class counts of that epoch. The same seed gives the same grid;
another seed (``--config.seed=1``) gives another.
"""

from __future__ import annotations

import math
import os

import numpy as np

from imgclf_jax import cli, distributed
from imgclf_jax.data import device_augment, pipeline, splits
from imgclf_jax.errors import ConfigError


def epoch_class_counts(train: pipeline.TrainPipeline, labels: np.ndarray, num_classes: int, epoch: int):
    """int64[num_classes]: how many rows of each class one training epoch yields."""
    return np.bincount(labels[train.epoch_rows(epoch)], minlength=num_classes)


def first_images(train: pipeline.TrainPipeline, epoch: int, count: int,
                 stage: device_augment.DeviceStage | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` real rows of an epoch: (float32[n, H, W, 3] as the model gets them: in [0, 1], or
    normalized when data.channel_mean/std are set (main undoes that for display), int32[n] labels).

    `stage`: the device half of a pipeline with ``augment_on='device'`` (its batches hold uint8 pixels and
    draws; the stage makes the model's batch, on the default device); None for a host pipeline."""
    images, labels = [], []
    start = epoch * train.steps_per_epoch
    needed = math.ceil(count / train.batch_size)
    for batch in train.batches(start, min(start + needed, (epoch + 1) * train.steps_per_epoch)):
        if stage is not None:
            batch = {key: np.asarray(value) for key, value in stage(batch).items()}
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def save_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str], title: str, path: str) -> None:
    """Writes a PNG grid of ``float32[n, H, W, 3]`` images in [0, 1], each titled with its class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows + 0.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(np.clip(images[k], 0.0, 1.0), interpolation="nearest")
            ax.set_title(f"class {class_names[labels[k]]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if distributed.is_primary():  # a multi-process run's files are process 0's to write
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_grid(data: splits.RunData, config, epoch: int, num_images: int, name: str, path: str):
    """Writes the PNG grid of the first `num_images` training rows of `epoch` (0-based) to `path`.

    The images are shown as pixels (per-channel normalization undone), titled with `name`, the seed,
    the epoch and its per-class counts. Also used by training for the run's preview.png (epoch 0),
    which TensorBoard shows (:mod:`imgclf_jax.tracking`).

    Returns (the images, float32[n, H, W, 3] in [0, 1]; int64[num_classes] class counts of the epoch;
    the training pipeline).
    """
    train = pipeline.train_pipeline(data.train, config, num_epochs=epoch + 1, on_device=False)  # the pixels
    counts = epoch_class_counts(train, data.train.labels, data.num_classes, epoch)
    norm = pipeline.normalization(config.data)
    stage = None
    if train.augment_on == "device":  # the same images training gets from its device stage
        stage = device_augment.DeviceStage.for_config(config)
    images, labels = first_images(train, epoch, num_images, stage)
    if norm is not None:  # show the pixels, not the model's normalized input
        images = images * norm[1] + norm[0]
    count_text = ", ".join(f"{cls}: {c}" for cls, c in zip(data.class_names, counts))
    repeats = ",".join(map(str, config.data.class_repeats)) or "1 each"
    title = (
        f"{name} seed {config.seed}, epoch {epoch + 1}: "
        f"{len(data.train)} examples x class repeats ({repeats}) = {train.epoch_size} rows, "
        f"{train.steps_per_epoch} batches of {config.train.batch_size}\nper class: {count_text}"
    )
    save_grid(images, labels, data.class_names, title, path)
    return images, counts, train


def counts_line(epoch: int, examples: int, rows: int, steps: int, class_counts: dict[str, int]) -> str:
    """The readable line preview prints after the grid, e.g.
    ``epoch 1: 1437 examples -> 1437 rows in 45 batches; per class: 0: 143, 1: 146, ...``."""
    per_class = ", ".join(f"{name}: {count}" for name, count in class_counts.items())
    return f"epoch {epoch}: {examples} examples -> {rows} rows in {steps} batches; per class: {per_class}"


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    args = cli.parse_args(argv, {"out": str, "epoch": int, "num_images": int})
    config = args.config
    if args.extras["out"] and any(w == "--workdir" or w.startswith("--workdir=") for w in argv):
        raise ConfigError("give --out FILE or --workdir DIR, not both (the grid goes to --out, "
                          "else to WORKDIR/preview.png)")
    out = args.extras["out"] or os.path.join(args.workdir, "preview.png")
    epoch = (1 if args.extras["epoch"] is None else args.extras["epoch"]) - 1  # 0-based inside
    if epoch < 0:
        raise ConfigError(f"--epoch counts from 1, got {epoch + 1}")
    num_images = 32 if args.extras["num_images"] is None else args.extras["num_images"]
    if num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {num_images}")
    data = splits.load_run_data(config.data)
    images, counts, train = write_grid(data, config, epoch, num_images, os.path.basename(args.config_path), out)
    print(f"wrote {out} ({len(images)} images)")
    print(counts_line(epoch + 1, len(data.train), train.epoch_size, train.steps_per_epoch,
                      dict(zip(data.class_names, counts.tolist()))))
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.preview")
