"""Augmentation on the accelerator (``data.augment_on='device'``) and the dataset in its memory (``data.on_device``).

With ``data.augment_on='host'`` the grain pipeline warps each image with scipy
(:mod:`imgclf_jax.data.augment`). With ``'device'`` the pipeline still draws every
image's parameters on the host, from the same per-image generator (seed, global
row position) and in the same order (``AugmentParams.draw``), but hands the batch
over as uint8 pixels plus those parameters; :class:`DeviceStage` then applies the
ops under ``jax.jit`` on the devices that hold the batch (``AugmentOp.device``,
:mod:`imgclf_jax.data.device_ops`), then the ``x / 255`` scale and the
per-channel normalization of the host path. So a seed gives the same batches on
either side to float tolerance (the flip and crop exactly; the warp's bilinear
sampling to about 1e-3 of 255, measured in ``tests/test_device_augment.py`` on real
images and quoted in README).

With ``data.on_device=true`` the training split itself lives on every device, as
``uint8[N, S, S, 3]`` (S = ``data.image_size``: the stored pixels when that is the
stored size, else resized once on the host exactly as the host path resizes), and
a batch carries only its rows, labels and drawn parameters: the device gathers
the pixels (:func:`load_table`; memory checked first by
:func:`imgclf_jax.memory.check_fits`). The epoch's resampled permutation is the
pipeline's, as before. Validation and test batches keep the host path (they are
decoded once per evaluation, not augmented).

``data.augment_on='auto'`` (the default) is chosen per backend (:func:`imgclf_jax.data.placement.resolve`):
'host' on CPU (the end-to-end gain measured there is within noise, and the host
path is the exact scipy call of the Keras recipe: README, "Augmentation on the
device"), 'device' on a GPU or TPU, whose host side cannot feed it (670-1,300
warped images/s on this project's 2-core CPU);
'device' whenever ``data.on_device`` is true. The choice is printed at start-up
and written to summary.json (``augment_on``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from imgclf_jax.data.augment import AugmentParams

def augment_images(images, params, recipe: AugmentParams):
    """Applies `recipe`'s ops that are on, in order, to every image (``jax.vmap`` over the leading axes).

    Args:
      images: ``float32[..., H, W, 3]`` in [0, 255] (a batch ``[B, ...]`` or an ensemble's ``[K, B, ...]``).
      params: ``float32[..., recipe.num_params]``: each image's draws (:meth:`AugmentParams.draw`).
      recipe: the ``augment`` section as :class:`AugmentParams`.
    Returns:
      ``float32[..., H, W, 3]`` in [0, 255].
    """
    import jax

    def one(image, drawn):
        offset = 0
        for entry, settings in recipe.steps:
            image = entry.device(image, drawn[offset:offset + entry.num_params], settings)
            offset += entry.num_params
        return image

    fn = one
    for _ in range(images.ndim - 3):
        fn = jax.vmap(fn)
    return fn(images, params)


def finish(batch: dict, recipe: AugmentParams, mean: np.ndarray | None, std: np.ndarray | None,
           table=None) -> dict:
    """The device half of a training batch: pixels (from the batch, or gathered from `table`), the ops,
    then ``x / 255`` and ``(x - mean) / std`` as the host's ``finish`` step.

    Args:
      batch: ``image uint8[..., H, W, 3]`` (absent with `table`), ``aug float32[..., P]``, ``label``,
        ``mask bool[...]``, ``row int32[...]`` (-1 = padding).
      table: ``uint8[N, H, W, 3]``, the training split by row (``data.on_device``), or None.
    Returns:
      The batch as the train step takes it: ``image float32[..., H, W, 3]``, ``label``, ``mask``, ``row``.
    """
    import jax.numpy as jnp

    out = {key: value for key, value in batch.items() if key not in ("aug", "image")}
    if table is not None:
        pixels = jnp.take(table, jnp.maximum(batch["row"], 0), axis=0)
        pixels = jnp.where(batch["mask"][..., None, None, None], pixels, jnp.zeros((), pixels.dtype))
    else:
        pixels = batch["image"]
    x = pixels.astype(jnp.float32)
    if recipe.active:
        x = augment_images(x, batch["aug"], recipe)
    x = x * jnp.float32(1.0 / 255.0)
    if mean is not None:
        x = (x - jnp.asarray(mean)) / jnp.asarray(std)
    out["image"] = x
    return out


def load_table(split, image_size: int, resize_method: str) -> np.ndarray:
    """``uint8[N, S, S, 3]``: every row of `split` decoded and resized as the host pipeline's load step does
    (:func:`imgclf_jax.data.imageio.resize`), in row order; grain threads, a progress bar."""
    from imgclf_jax.data import pipeline
    from imgclf_jax.progress import Bar

    batch = 256
    table = np.empty((len(split), image_size, image_size, 3), np.uint8)
    ds = pipeline.rows_dataset(split, image_size, resize_method).batch(batch)
    with Bar(len(split), "training split -> device memory") as bar:
        for j, images in enumerate(pipeline.iterate(ds, 0)):
            table[j * batch:j * batch + len(images["image"])] = images["image"]
            bar.update(len(images["image"]))
    return table


def table_bytes(num_rows: int, image_size: int) -> int:
    """Bytes of the on-device training split: N x S x S x 3 (uint8)."""
    return int(num_rows) * image_size * image_size * 3


@dataclasses.dataclass
class DeviceStage:
    """The jitted device half of a run's training batches (:func:`finish`), for ``data.augment_on='device'``.

    ``stage(batch)`` takes the batch as :func:`imgclf_jax.parallel.shard_batch` placed it and returns the
    train step's batch with the same sharding (`sharding`: the batch arrays' sharding, None = one device).
    `table`: the training split on the devices (``data.on_device``: :func:`load_table`, replicated), or None.
    """

    recipe: AugmentParams
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    table: Any = None
    sharding: Any = None

    def __post_init__(self):
        import functools

        import jax

        fn = functools.partial(finish, recipe=self.recipe, mean=self.mean, std=self.std)
        kwargs = {} if self.sharding is None else {"out_shardings": self.sharding}
        self._fn = jax.jit(lambda batch, table: fn(batch, table=table), **kwargs)

    def __call__(self, batch: dict) -> dict:
        return self._fn(batch, self.table)

    @classmethod
    def for_config(cls, config, table=None, sharding=None) -> "DeviceStage":
        """The stage of a run config's ``augment`` recipe and ``data`` normalization."""
        from imgclf_jax.data import pipeline

        norm = pipeline.normalization(config.data)
        mean, std = norm if norm is not None else (None, None)
        return cls(AugmentParams(**config.augment.to_dict()), mean, std, table, sharding)


def stage_for(train, split, config, mesh, members: bool = False) -> DeviceStage | None:
    """The run's :class:`DeviceStage` for its training pipeline `train`, or None when it augments on the host.

    Args:
      train: the :class:`imgclf_jax.data.pipeline.TrainPipeline` (its ``augment_on``, ``on_device``).
      split: the training split (decoded into the device table when ``train.on_device``).
      config: the run config (``augment``, ``data`` sections).
      mesh: the run's mesh; the table is replicated on it, the batch keeps its sharding.
      members: the batches are an ensemble's stacked ``[K, B, ...]`` (sharded along B).
    """
    if train.augment_on != "device":
        return None
    from imgclf_jax import parallel

    table = None
    if train.on_device:
        table = parallel.replicate(load_table(split, config.data.image_size, config.data.resize_method),
                                   parallel.replicated(mesh))
    sharding = parallel.member_batch_sharded(mesh) if members else parallel.batch_sharded(mesh)
    return DeviceStage.for_config(config, table, sharding)
