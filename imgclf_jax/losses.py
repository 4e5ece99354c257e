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
An entry also declares the ``loss.*`` keys it reads (``keys {key: default}``, with
value ``checks``): the config's ``loss`` section is ``loss.name`` plus the union of
the entries' keys, a key the chosen loss does not read must stay at its default,
and the step gets ``functools.partial(fn, **{key: config value})``
(:func:`imgclf_jax.steps.eval_hooks`).

Label smoothing (``loss.label_smoothing`` = eps, the 'softmax_cross_entropy' entry):
the targets are ``(1 - eps) * t + eps / C`` for the one-hot labels and for a batch
transform's soft targets alike (Szegedy et al. 2016, "Rethinking the Inception
Architecture for Computer Vision", section 7; ``optax.smooth_labels``). It applies
to the training and the evaluation loss alike (Keras's convention: the reported
``val_loss`` is the smoothed loss); accuracy is unaffected.

Adding a loss is one entry::

    from imgclf_jax.losses import LOSSES, LossEntry

    def squared_error(logits, batch): ...

    LOSSES.register("squared_error", LossEntry(squared_error, soft_targets=False))

(``fn(logits, batch, **settings)`` when the entry declares ``keys``.)

then ``--config.loss.name=squared_error``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from imgclf_jax.errors import ConfigError
from imgclf_jax.registry import Checks, Registry, check_values, is_zero

DEFAULT = "softmax_cross_entropy"

LossFn = Callable[[jax.Array, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossEntry:
    """One loss of :data:`LOSSES`.

    Attributes:
      fn: ``fn(logits float[B, C], batch, **settings) -> float32[]`` (see the module docstring);
        ``settings`` are this entry's `keys` with the config's values.
      soft_targets: whether `fn` reads ``batch['targets']`` when present (soft labels from a
        batch transform); False means it reads only ``label`` and cannot follow such a transform.
      keys: ``{key: default}`` of the ``loss.*`` keys `fn` reads (besides ``name``); the schema's
        loss section is the union over the entries, and a key the chosen loss does not read must
        stay at its default.
      checks: ``{key: (ok(value), 'what it must be')}`` for keys of `keys`.
    """

    fn: LossFn
    soft_targets: bool
    keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checks: Checks = dataclasses.field(default_factory=dict)

    def validate(self, loss_config: Any) -> None:
        """Checks the values of this entry's keys. Raises ConfigError naming the key."""
        check_values(loss_config, "loss", self.checks)


LOSSES = Registry("loss.name")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy over the real rows of a padded batch.

    Keras's categorical cross-entropy on a softmax output, computed from logits
    (``optax.softmax_cross_entropy_with_integer_labels``) and averaged over the
    rows where ``mask`` is True; padded rows contribute nothing, whatever their
    logits (even NaN/inf).

    Args:
      logits: float[B, num_classes].
      labels: int[B] class indices (any value in padded rows).
      mask: bool[B], True for real rows.
      label_smoothing: eps in [0, 1): the targets are ``(1 - eps) * one_hot + eps / num_classes``
        (Szegedy et al. 2016, section 7). 0 is the plain integer-label loss, the same arithmetic
        as before the key existed.

    Returns:
      float32[]: sum of the real rows' losses / max(number of real rows, 1).
    """
    mask = jnp.asarray(mask, bool)
    labels = jnp.where(mask, labels, 0)
    if not is_zero(label_smoothing):  # an array (a population member's value) keeps the smoothing
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
        return soft_softmax_cross_entropy(logits, targets, mask, label_smoothing)
    logits = jnp.where(mask[:, None], logits.astype(jnp.float32), 0.0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    total = jnp.sum(jnp.where(mask, losses, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def soft_softmax_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                               label_smoothing: float = 0.0) -> jax.Array:
    """As :func:`softmax_cross_entropy` with soft labels: ``-sum_c targets[b, c] log softmax(logits)[b, c]``.

    Args:
      logits: float[B, num_classes].
      targets: float[B, num_classes] class probabilities (any values in padded rows).
      mask: bool[B], True for real rows.
      label_smoothing: eps in [0, 1): the targets become ``(1 - eps) * targets + eps / num_classes``
        (``optax.smooth_labels``); 0 leaves them as they are.

    Returns:
      float32[]: the real rows' mean (0 when there are none).
    """
    mask = jnp.asarray(mask, bool)
    targets = jnp.where(mask[:, None], targets.astype(jnp.float32), 0.0)
    if not is_zero(label_smoothing):  # an array (a population member's value) keeps the smoothing
        targets = optax.smooth_labels(targets, label_smoothing)
    logits = jnp.where(mask[:, None], logits.astype(jnp.float32), 0.0)
    losses = optax.softmax_cross_entropy(logits, targets)
    total = jnp.sum(jnp.where(mask, losses, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _cross_entropy_loss(logits: jax.Array, batch: dict, label_smoothing: float = 0.0) -> jax.Array:
    """The 'softmax_cross_entropy' entry: soft ``targets`` when the batch has them, else ``label``;
    either smoothed by ``label_smoothing`` (``loss.label_smoothing``)."""
    if "targets" in batch:
        return soft_softmax_cross_entropy(logits, batch["targets"], batch["mask"], label_smoothing)
    return softmax_cross_entropy(logits, batch["label"], batch["mask"], label_smoothing)


LOSSES.register(DEFAULT, LossEntry(
    _cross_entropy_loss, soft_targets=True,
    keys={"label_smoothing": 0.0},  # eps: targets (1 - eps) t + eps / C; 0 = off
    checks={"label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)")}))


def check_targets(loss_name: str, makes_targets: bool, transform_name: str) -> None:
    """Refuses a loss that cannot take the soft targets the chosen batch transform makes.

    Raises:
      ConfigError: `loss_name` unknown, or its entry has ``soft_targets=False`` while `makes_targets`.
    """
    if makes_targets and not LOSSES.get(loss_name).soft_targets:
        raise ConfigError(f"config key 'loss.name' ({loss_name!r}) reads only the labels, but "
                          f"train.batch_transform={transform_name!r} makes soft targets: choose a loss "
                          "that takes them (e.g. 'softmax_cross_entropy') or no batch transform")
