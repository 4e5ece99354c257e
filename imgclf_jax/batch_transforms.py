"""Per-batch transforms by name (config key ``train.batch_transform``; '' = off, the default).

A batch transform runs inside the jitted train step, on the device, before the
forward pass: ``fn(batch, key, num_classes) -> batch`` (``num_classes``: the run's class count,
the width of any ``targets`` it makes). ``batch`` is the step's batch
(``image float32[B, H, W, 3]``: in [0, 1], or per-channel normalized when ``data.channel_mean`` /
``channel_std`` are set (:mod:`imgclf_jax.data.pipeline`), ``label int32[B]``, ``mask bool[B]``);
the transform returns a batch of the same shapes and may add
``targets float32[B, num_classes]`` (soft labels, rows summing to 1; the loss then
reads them, see :mod:`imgclf_jax.losses`). It must leave padding rows padding
(``mask`` False stays False). Its key is :func:`transform_key` of the step's
dropout key: the dropout key itself is unchanged, so turning a transform on
changes nothing else. In a K-member job each member gets its own key.

Nothing is registered yet (MixUp and CutMix are planned). Adding one::

    from imgclf_jax.batch_transforms import BATCH_TRANSFORMS, BatchTransform

    def mixup(batch, key, num_classes): ...  # returns dict(batch, image=..., targets=...)

    BATCH_TRANSFORMS.register("mixup", BatchTransform(mixup, makes_targets=True))

then ``--config.train.batch_transform=mixup``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from imgclf_jax.registry import Registry

# Folded into the step's dropout key to give the transform's key (an arbitrary constant: 'btfm').
KEY_SALT = 0x6274666D

BatchTransformFn = Callable[..., dict]  # fn(batch, key, num_classes) -> batch; the step calls it bound


@dataclasses.dataclass(frozen=True)
class BatchTransform:
    """One entry of :data:`BATCH_TRANSFORMS`.

    Attributes:
      fn: ``fn(batch, key) -> batch`` (see the module docstring).
      makes_targets: whether the returned batch carries ``targets`` (soft labels); the chosen
        loss must then take them (checked at build time, :func:`imgclf_jax.losses.check_targets`).
    """

    fn: BatchTransformFn
    makes_targets: bool


BATCH_TRANSFORMS = Registry("train.batch_transform", off="")


def transform_key(dropout_key: jax.Array) -> jax.Array:
    """The transform's key of one step: ``fold_in(dropout_key, KEY_SALT)`` (dropout_key itself unused)."""
    return jax.random.fold_in(dropout_key, KEY_SALT)
