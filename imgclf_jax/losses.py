"""Losses by name (config key ``loss.name``): the data term of the training objective.

A loss is ``loss(logits float[B, C], batch) -> float32[]``, where ``batch`` is a
pipeline batch (``label int32[B]``, ``mask bool[B]``: False on padding rows) and,
when a batch transform made them (``train.batch_transform``, e.g. MixUp),
``targets float32[B, C]`` (soft labels, rows summing to 1). The L2 term is not
part of the loss: it comes from the model's kernel list
(:func:`imgclf_jax.models.l2_penalty`) and :mod:`imgclf_jax.steps` adds it.

Entries (:class:`LossEntry`) say whether they take soft targets; a loss that does
not is refused at build time (:func:`check_targets`, called by config validation
and :func:`imgclf_jax.steps.recipe_hooks`) rather than silently using the labels.

Adding a loss is one entry::

    from imgclf_jax.losses import LOSSES, LossEntry

    def squared_error(logits, batch): ...

    LOSSES.register("squared_error", LossEntry(squared_error, soft_targets=False))

then ``--config.loss.name=squared_error``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from imgclf_jax.errors import ConfigError
from imgclf_jax.registry import Registry

DEFAULT = "softmax_cross_entropy"

LossFn = Callable[[jax.Array, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossEntry:
    """One loss of :data:`LOSSES`.

    Attributes:
      fn: ``fn(logits float[B, C], batch) -> float32[]`` (see the module docstring).
      soft_targets: whether `fn` reads ``batch['targets']`` when present (soft labels from a
        batch transform); False means it reads only ``label`` and cannot follow such a transform.
    """

    fn: LossFn
    soft_targets: bool


LOSSES = Registry("loss.name")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the real rows of a padded batch.

    Keras's categorical cross-entropy on a softmax output, computed from logits
    (``optax.softmax_cross_entropy_with_integer_labels``) and averaged over the
    rows where ``mask`` is True; padded rows contribute nothing, whatever their
    logits (even NaN/inf).

    Args:
      logits: float[B, num_classes].
      labels: int[B] class indices (any value in padded rows).
      mask: bool[B], True for real rows.

    Returns:
      float32[]: sum of the real rows' losses / max(number of real rows, 1).
    """
    mask = jnp.asarray(mask, bool)
    labels = jnp.where(mask, labels, 0)
    logits = jnp.where(mask[:, None], logits.astype(jnp.float32), 0.0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    total = jnp.sum(jnp.where(mask, losses, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def soft_softmax_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """As :func:`softmax_cross_entropy` with soft labels: ``-sum_c targets[b, c] log softmax(logits)[b, c]``.

    Args:
      logits: float[B, num_classes].
      targets: float[B, num_classes] class probabilities (any values in padded rows).
      mask: bool[B], True for real rows.

    Returns:
      float32[]: the real rows' mean (0 when there are none).
    """
    mask = jnp.asarray(mask, bool)
    targets = jnp.where(mask[:, None], targets.astype(jnp.float32), 0.0)
    logits = jnp.where(mask[:, None], logits.astype(jnp.float32), 0.0)
    losses = optax.softmax_cross_entropy(logits, targets)
    total = jnp.sum(jnp.where(mask, losses, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _cross_entropy_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """The 'softmax_cross_entropy' entry: soft ``targets`` when the batch has them, else ``label``."""
    if "targets" in batch:
        return soft_softmax_cross_entropy(logits, batch["targets"], batch["mask"])
    return softmax_cross_entropy(logits, batch["label"], batch["mask"])


LOSSES.register(DEFAULT, LossEntry(_cross_entropy_loss, soft_targets=True))


def check_targets(loss_name: str, makes_targets: bool, transform_name: str) -> None:
    """Refuses a loss that cannot take the soft targets the chosen batch transform makes.

    Raises:
      ConfigError: `loss_name` unknown, or its entry has ``soft_targets=False`` while `makes_targets`.
    """
    if makes_targets and not LOSSES.get(loss_name).soft_targets:
        raise ConfigError(f"config key 'loss.name' ({loss_name!r}) reads only the labels, but "
                          f"train.batch_transform={transform_name!r} makes soft targets: choose a loss "
                          "that takes them (e.g. 'softmax_cross_entropy') or no batch transform")
