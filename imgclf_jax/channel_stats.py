"""Per-channel mean and std of a config's training images, for ``data.channel_mean`` / ``data.channel_std``.

Usage::

  python -m imgclf_jax.channel_stats --config configs/NAME.py [--config.data.dir=...] [--config.KEY=VALUE ...]

Reads every row of the config's training split once (no class repeats, no
augmentation), decoded and resized to ``data.image_size`` exactly as training
reads them, and prints, in units of the [0, 1] pixel scale (x / 255):

  - the overrides, ready to paste:
    ``--config.data.channel_mean=0.4914,0.4822,0.4465 --config.data.channel_std=0.2470,0.2435,0.2616``
  - the same as config-file lines (``c.data.channel_mean = (...)``).

mean_c = the mean of channel c over every pixel of every image; std_c = the
population standard deviation over the same pixels, sqrt(E[x^2] - E[x]^2)
(sums in float64). A normalization already set in the config is ignored (the
statistics are of the pixels). Prepares the data first if needed, as train
does; progress goes to stderr. Imports no part of training.
"""

from __future__ import annotations

import numpy as np

from imgclf_jax import cli
from imgclf_jax import progress as progress_lib
from imgclf_jax.data import pipeline, splits

BATCH = 256  # images per pipeline batch (memory: BATCH x H x W x 3 float32)


def channel_stats(split: splits.Split, config, desc: str = "channel stats") -> tuple[np.ndarray, np.ndarray]:
    """(mean float64[3], std float64[3]) over every pixel of `split`, in units of the [0, 1] scale.

    Images are read as evaluation reads them (resized to ``data.image_size``, no augmentation),
    with any normalization of `config` off. Progress is a :class:`imgclf_jax.progress.Bar`.

    Raises:
      ValueError: the split is empty.
    """
    if len(split) == 0:
        raise ValueError("the split has no images")
    plain = config.copy_and_resolve_references()
    plain.data.channel_mean, plain.data.channel_std = (), ()
    total = np.zeros(3, np.float64)
    squares = np.zeros(3, np.float64)
    pixels = 0
    bar = progress_lib.Bar(len(split), desc)
    try:
        for batch in pipeline.iterate(pipeline.eval_dataset(split, plain, batch_size=BATCH),
                                      config.data.num_workers):
            images = batch["image"][batch["mask"]].astype(np.float64)  # [n, H, W, 3] in [0, 1]
            total += images.sum(axis=(0, 1, 2))
            squares += np.square(images).sum(axis=(0, 1, 2))
            pixels += images.shape[0] * images.shape[1] * images.shape[2]
            bar.update(len(images))
    finally:
        bar.close()
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    return mean, std


def _numbers(values: np.ndarray, sep: str) -> str:
    return sep.join(f"{v:.4f}" for v in values)


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    args = cli.parse_args(argv, workdir=False)
    config = args.config
    data = splits.load_run_data(config.data)
    mean, std = channel_stats(data.train, config)
    if not np.all(std > 0):
        print(f"warning: a channel has std 0 (every pixel equal): data.channel_std must be > 0; "
              f"got {_numbers(std, ', ')}")
    size = config.data.image_size
    print(f"{len(data.train):,} training images at {size}x{size}, per channel (R, G, B), [0, 1] scale:")
    print(f"--config.data.channel_mean={_numbers(mean, ',')} --config.data.channel_std={_numbers(std, ',')}")
    print(f"c.data.channel_mean = ({_numbers(mean, ', ')})")
    print(f"c.data.channel_std = ({_numbers(std, ', ')})")
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.channel_stats")
