"""Per-batch transforms by name (config key ``train.batch_transform``; '' = off, the default).

A batch transform runs inside the jitted train step, on the device, before the
forward pass: ``fn(batch, key, *, num_classes, **settings) -> batch`` (``num_classes``:
the run's class count, the width of any ``targets`` it makes; ``settings``: the
entry's ``mixing.*`` keys, see below). ``batch`` is the step's batch
(``image float32[B, H, W, 3]``: in [0, 1], or per-channel normalized when ``data.channel_mean`` /
``channel_std`` are set (:mod:`imgclf_jax.data.pipeline`), ``label int32[B]``, ``mask bool[B]``);
the transform returns a batch of the same shapes and may add
``targets float32[B, num_classes]`` (soft labels, rows summing to 1; the loss then
reads them, see :mod:`imgclf_jax.losses`). It must leave padding rows padding
(``mask`` False stays False) and must not let them into a real row. Its key is
:func:`transform_key` of the step's dropout key: the dropout key itself is
unchanged, so turning a transform on changes nothing else. In a K-member job each
member gets its own key.

Entries (:class:`BatchTransform`) declare the config keys they read (``keys
{key: default}``, value ``checks``), as the optimizers do: the config's ``mixing``
section is the union of every entry's keys, and a key the chosen transform does not
read (every key, when ``train.batch_transform=''``) must stay at its default.
:func:`imgclf_jax.steps.recipe_hooks` binds them: the step calls ``fn(batch, key)``.

The entries (one lambda, one partner permutation, one coin per batch):

- 'mixup' (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"):
  ``lambda ~ Beta(alpha, alpha)``; ``image = lambda x + (1 - lambda) x[perm]``,
  ``targets = lambda onehot(y) + (1 - lambda) onehot(y[perm])``;
- 'cutmix' (Yun et al. 2019, "CutMix"): a box of area fraction ``1 - lambda``
  (sides ``floor(H sqrt(1 - lambda))``, ``floor(W sqrt(1 - lambda))``), centre uniform
  over the pixels, clipped at the borders, filled with the partner's pixels; the
  partner's label weight is the exact fraction of pasted pixels after clipping
  (:func:`cutmix_box`);
- 'mixup_cutmix': per batch one of the two, each with probability 0.5 (timm's
  ``Mixup`` switch, ``switch_prob=0.5``), with the same lambda.

Keys (section ``mixing``): ``alpha`` (> 0; Beta(alpha, alpha); 1.0 = uniform lambda)
and ``probability`` (in [0, 1]: per batch the transform applies with this probability,
else the batch is unchanged but still gets one-hot ``targets``).

The partner permutation (:func:`partner_permutation`) pairs real rows only with real
rows; padding rows are their own partners and are returned unchanged.

Adding one::

    from imgclf_jax.batch_transforms import BATCH_TRANSFORMS, BatchTransform

    def my_mix(batch, key, *, num_classes, alpha): ...  # returns dict(batch, image=..., targets=...)

    BATCH_TRANSFORMS.register("my_mix", BatchTransform(my_mix, makes_targets=True, keys={"alpha": 1.0}))

then ``--config.train.batch_transform=my_mix``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from imgclf_jax.registry import Checks, Registry, check_values

# Folded into the step's dropout key to give the transform's key (an arbitrary constant: 'btfm').
KEY_SALT = 0x6274666D

SECTION = "mixing"  # the config section of the entries' keys

BatchTransformFn = Callable[..., dict]  # fn(batch, key, num_classes, **settings) -> batch; the step calls it bound


@dataclasses.dataclass(frozen=True)
class BatchTransform:
    """One entry of :data:`BATCH_TRANSFORMS`.

    Attributes:
      fn: ``fn(batch, key, *, num_classes, **settings) -> batch`` (see the module docstring);
        ``settings`` are this entry's `keys` with the config's values.
      makes_targets: whether the returned batch carries ``targets`` (soft labels); the chosen
        loss must then take them (checked at build time, :func:`imgclf_jax.losses.check_targets`).
      keys: ``{key: default}`` of the ``mixing.*`` keys `fn` reads; the schema's ``mixing``
        section is the union over the entries, and a key the chosen entry does not read must
        stay at its default.
      checks: ``{key: (ok(value), 'what it must be')}`` for keys of `keys`.
    """

    fn: BatchTransformFn
    makes_targets: bool
    keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checks: Checks = dataclasses.field(default_factory=dict)

    def validate(self, mixing_config: Any) -> None:
        """Checks the values of this entry's keys. Raises ConfigError naming the key."""
        check_values(mixing_config, SECTION, self.checks)


BATCH_TRANSFORMS = Registry("train.batch_transform", off="")


def transform_key(dropout_key: jax.Array) -> jax.Array:
    """The transform's key of one step: ``fold_in(dropout_key, KEY_SALT)`` (dropout_key itself unused)."""
    return jax.random.fold_in(dropout_key, KEY_SALT)


# --------------------------------------------------------------------------- MixUp, CutMix


def partner_permutation(key: jax.Array, mask: jax.Array) -> jax.Array:
    """A uniformly random permutation of the real rows, the identity on the padding rows.

    Two random orders of the batch with the padding rows sorted last (stably, so in index
    order in both): the j-th real row of the first order gets the j-th real row of the
    second as its partner. A row may be its own partner (as ``torch.randperm`` in Zhang et
    al.'s code allows); then mixing leaves it as it is.

    Args:
      key: a PRNG key.
      mask: bool[B], True for real rows.

    Returns:
      int32[B] ``perm``: ``perm[i]`` is row i's partner; real rows map onto real rows one to one,
      ``perm[p] == p`` for every padding row p.
    """
    mask = jnp.asarray(mask, bool)
    first, second = jax.random.uniform(key, (2, mask.shape[0]))
    order_a = jnp.argsort(jnp.where(mask, first, jnp.inf), stable=True)
    order_b = jnp.argsort(jnp.where(mask, second, jnp.inf), stable=True)
    return jnp.zeros(mask.shape[0], jnp.int32).at[order_a].set(order_b.astype(jnp.int32))


def cutmix_box(lam: jax.Array, centre_y: jax.Array, centre_x: jax.Array, height: int,
               width: int) -> tuple[jax.Array, jax.Array]:
    """The CutMix box of one batch and the partner's label weight (Yun et al. 2019, section 3.1).

    Sides ``cut_h = floor(height * sqrt(1 - lam))``, ``cut_w = floor(width * sqrt(1 - lam))``
    (area fraction 1 - lam before clipping); rows ``[centre_y - cut_h // 2, + cut_h)`` and
    columns ``[centre_x - cut_w // 2, + cut_w)``, clipped to the image.

    Args:
      lam: float32[] lambda in [0, 1].
      centre_y, centre_x: int32[] the box centre's pixel (uniform over the image when drawn).
      height, width: the image's size in pixels.

    Returns:
      (bool[height, width] True inside the box, float32[] the fraction of the image's pixels inside
      the clipped box: the partner's label weight, exactly the pasted share).
    """
    side = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * side).astype(jnp.int32)
    cut_w = jnp.floor(width * side).astype(jnp.int32)
    y0 = jnp.clip(centre_y - cut_h // 2, 0, height)
    y1 = jnp.clip(centre_y - cut_h // 2 + cut_h, 0, height)
    x0 = jnp.clip(centre_x - cut_w // 2, 0, width)
    x1 = jnp.clip(centre_x - cut_w // 2 + cut_w, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    weight = ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / jnp.float32(height * width)
    return box, weight


def _draws(key: jax.Array, batch: dict, alpha: float, probability: float) -> dict:
    """One batch's draws: applies (bool[]), lam (float32[]), perm (int32[B]), the box centre, the switch."""
    _, height, width, _ = batch["image"].shape
    k_apply, k_lam, k_perm, k_y, k_x, k_switch = jax.random.split(key, 6)
    return {
        "applies": jax.random.uniform(k_apply) < probability,
        "lam": jax.random.beta(k_lam, alpha, alpha, dtype=jnp.float32),
        "perm": partner_permutation(k_perm, batch["mask"]),
        "centre_y": jax.random.randint(k_y, (), 0, height),
        "centre_x": jax.random.randint(k_x, (), 0, width),
        "cutmix": jax.random.uniform(k_switch) < 0.5,  # mixup_cutmix's switch
    }


def _mix(batch: dict, draws: dict, num_classes: int, use_cutmix: jax.Array | bool) -> dict:
    """Mixes each real row with its partner (MixUp, or CutMix where `use_cutmix`) when the batch applies."""
    images, mask = batch["image"], jnp.asarray(batch["mask"], bool)
    perm, lam = draws["perm"], draws["lam"]
    partner = images[perm]
    box, box_weight = cutmix_box(lam, draws["centre_y"], draws["centre_x"], images.shape[1], images.shape[2])
    mixup_images = lam * images + (1.0 - lam) * partner
    cutmix_images = jnp.where(box[None, :, :, None], partner, images)
    mixed = jnp.where(use_cutmix, cutmix_images, mixup_images)
    partner_weight = jnp.where(use_cutmix, box_weight, 1.0 - lam)
    partner_weight = jnp.where(draws["applies"], partner_weight, 0.0)
    keep = draws["applies"] & mask  # padding rows and a batch that does not apply: unchanged
    image = jnp.where(keep[:, None, None, None], mixed, images).astype(images.dtype)
    labels = jnp.where(mask, batch["label"], 0)
    own, other = jax.nn.one_hot(labels, num_classes), jax.nn.one_hot(labels[perm], num_classes)
    targets = jnp.where(keep[:, None], (1.0 - partner_weight) * own + partner_weight * other, own)
    return dict(batch, image=image, targets=targets.astype(jnp.float32))


def mixup(batch: dict, key: jax.Array, *, num_classes: int, alpha: float, probability: float) -> dict:
    """MixUp of one batch (see the module docstring): one lambda ~ Beta(alpha, alpha), one permutation.

    Args:
      batch: ``image float32[B, H, W, 3]``, ``label int32[B]``, ``mask bool[B]``.
      key: the transform's key; num_classes: width of ``targets``;
      alpha: Beta's parameter (> 0); probability: chance that the batch is mixed.

    Returns:
      the batch with mixed ``image`` (real rows) and ``targets float32[B, num_classes]``.
    """
    return _mix(batch, _draws(key, batch, alpha, probability), num_classes, use_cutmix=False)


def cutmix(batch: dict, key: jax.Array, *, num_classes: int, alpha: float, probability: float) -> dict:
    """CutMix of one batch (see the module docstring and :func:`cutmix_box`); arguments as :func:`mixup`."""
    return _mix(batch, _draws(key, batch, alpha, probability), num_classes, use_cutmix=True)


def mixup_cutmix(batch: dict, key: jax.Array, *, num_classes: int, alpha: float, probability: float) -> dict:
    """Per batch MixUp or CutMix, each with probability 0.5 (timm's switch); arguments as :func:`mixup`."""
    draws = _draws(key, batch, alpha, probability)
    return _mix(batch, draws, num_classes, use_cutmix=draws["cutmix"])


_MIXING_KEYS = {"alpha": 1.0, "probability": 1.0}
_MIXING_CHECKS: Checks = {"alpha": (lambda v: v > 0, "> 0"),
                          "probability": (lambda v: 0 <= v <= 1, "in [0, 1]")}
for _name, _fn in (("mixup", mixup), ("cutmix", cutmix), ("mixup_cutmix", mixup_cutmix)):
    BATCH_TRANSFORMS.register(_name, BatchTransform(_fn, makes_targets=True, keys=_MIXING_KEYS,
                                                    checks=_MIXING_CHECKS))
