"""The JAX halves of the augmentation ops: one image and its drawn parameters -> the augmented image.

Each function here is the accelerator twin of a host op of :mod:`imgclf_jax.data.augment`
(``AugmentOp.device``): ``f(image float32[H, W, 3] in [0, 255], params float32[P], settings)
-> float32[H, W, 3]``, pure, for ``jax.vmap`` over a batch under ``jax.jit``
(:mod:`imgclf_jax.data.device_augment`). ``params`` is the host op's ``draw`` output, so a seed
gives the same augmentation on either side, to float tolerance:

- the warp samples the same source coordinates as ``scipy.ndimage.affine_transform(order=1,
  mode='nearest')`` with ``jax.scipy.ndimage.map_coordinates(order=1, mode='nearest')``, in float32
  (scipy computes them in float64: a coordinate differs by about 1e-5 pixel, a pixel value by
  about 1e-3 of 255; the measured maximum is in README's "Augmentation on the device");
- the flip and the crop move whole pixels, so they are exact.

jax is imported inside the functions: :mod:`imgclf_jax.config` imports the op table, and the
config tools stay free of jax's start-up time.
"""

from __future__ import annotations

from typing import Any, Mapping


def keras_affine(image, params, settings: Mapping[str, Any]):
    """Warps ``float32[H, W, 3]`` by the drawn matrix ``params = float32[6]`` (the top two rows of
    :func:`imgclf_jax.data.augment.affine_matrix`: output (row, col, 1) -> source (row, col)); bilinear,
    positions outside the image take the nearest edge pixel (each channel separately, as scipy)."""
    del settings
    import jax
    import jax.numpy as jnp
    from jax.scipy.ndimage import map_coordinates

    height, width = image.shape[:2]
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    m = params.astype(jnp.float32)
    src_rows = m[0] * rows + m[1] * cols + m[2]
    src_cols = m[3] * rows + m[4] * cols + m[5]
    channel = lambda plane: map_coordinates(plane, [src_rows, src_cols], order=1, mode="nearest")
    return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


def horizontal_flip(image, params, settings: Mapping[str, Any]):
    """The columns of ``float32[H, W, 3]`` reversed where ``params[0]`` (float32[1]) is 1, else unchanged."""
    del settings
    import jax.numpy as jnp

    return jnp.where(params[0] > 0.5, image[:, ::-1], image)


def random_crop(image, params, settings: Mapping[str, Any]):
    """Pads ``float32[H, W, 3]`` by ``crop_padding`` pixels per side (``jnp.pad`` with
    ``crop_padding_mode``, numpy's modes) and takes the ``[H, W]`` window at (top, left) =
    ``params`` (float32[2], whole pixels in {0..2p})."""
    import jax
    import jax.numpy as jnp

    p = settings["crop_padding"]
    height, width, channels = image.shape
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)), mode=settings["crop_padding_mode"])
    top, left = params[0].astype(jnp.int32), params[1].astype(jnp.int32)
    return jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))
