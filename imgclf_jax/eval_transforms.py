"""Evaluation-time transforms by name (config key ``train.eval_transform``; '' = off, the default).

An eval transform wraps the forward pass of the eval step (validation, test,
predict, and each member of an ensemble before its vote):
``fn(apply_logits, images) -> logits``, where
``apply_logits(images float32[N, H, W, 3]) -> float32[N, C]`` runs the model with
dropout off (BatchNorm in eval mode) and ``images`` is the batch's
``float32[B, H, W, 3]`` (as the pipeline yields it: in [0, 1], or per-channel
normalized). It returns ``float32[B, C]`` logits; the eval step's loss and
probabilities are computed from them as without a transform. Test-time
augmentation averages views this way.

Entries (:data:`EVAL_TRANSFORMS`):

- ``'horizontal_flip_tta'``: the mean softmax over the image and its mirror (2 views);
- ``'flip_shift_tta'`` (key ``tta.shift_pixels`` = s, default 2): the mean softmax over
  {image, mirror} x {no shift, shift by +s and by -s rows, by +s and by -s columns}
  = 2 x 5 = 10 views, each shift a translation with reflect padding (no diagonal shifts).

An entry's keys live in the config section ``tta`` (:func:`tta_defaults`, the
union over the entries, like the optimizer entries' keys in ``optimizer``); a
key the chosen transform does not read must stay at its default.

Adding one (a plain function is an entry without keys)::

    from imgclf_jax.eval_transforms import EVAL_TRANSFORMS, EvalTransform

    @EVAL_TRANSFORMS.register("my_tta")
    def my_tta(apply_logits, images): ...

    def crops_tta(apply_logits, images, *, crop_pixels): ...
    EVAL_TRANSFORMS.register("crops_tta", EvalTransform(crops_tta, keys={"crop_pixels": 4},
                                                        checks={"crop_pixels": (lambda v: v >= 1, ">= 1")}))

then ``--config.train.eval_transform=crops_tta --config.tta.crop_pixels=6``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from imgclf_jax.errors import ConfigError
from imgclf_jax.registry import Registry

ApplyLogits = Callable[[jax.Array], jax.Array]
EvalTransformFn = Callable[[ApplyLogits, jax.Array], jax.Array]
Checks = Mapping[str, tuple[Callable[[Any], bool], str]]

EVAL_TRANSFORMS = Registry("train.eval_transform", off="")


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """One entry of :data:`EVAL_TRANSFORMS` with config keys.

    Attributes:
      fn: ``fn(apply_logits, images, **settings) -> logits`` (module docstring), ``settings``
        being ``{key: value}`` of `keys`.
      keys: ``{key: default}`` of the ``tta.*`` keys `fn` reads.
      checks: ``{key: (ok(value), 'what it must be')}`` for keys of `keys`.

    Calling the entry itself runs `fn` with the keys at their defaults.
    """

    fn: Callable[..., jax.Array]
    keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checks: Checks = dataclasses.field(default_factory=dict)

    def bind(self, tta_section: Any = None) -> EvalTransformFn:
        """``fn(apply_logits, images)`` with this entry's keys read from `tta_section` (a ConfigDict or
        dict; None or a key absent, as in the config.json of a run saved before the key existed = its
        default). An entry without keys returns `fn` itself."""
        if not self.keys:
            return self.fn
        section = tta_section or {}
        return functools.partial(self.fn, **{k: section.get(k, d) for k, d in self.keys.items()})

    def validate(self, tta_section: Any) -> None:
        """Checks the values of this entry's keys. Raises ConfigError naming ``tta.KEY``."""
        for key, (ok, what) in self.checks.items():
            value = tta_section[key]
            if not ok(value):
                raise ConfigError(f"config key 'tta.{key}' must be {what}, got {value!r}")

    def __call__(self, apply_logits: ApplyLogits, images: jax.Array) -> jax.Array:
        return self.bind()(apply_logits, images)


def entry(name: str) -> EvalTransform | None:
    """The entry named `name` as an :class:`EvalTransform` (a registered plain function: one without
    keys); None for '' (off).

    Raises:
      ConfigError: no such entry (one line listing the names).
    """
    found = EVAL_TRANSFORMS.get(name)
    if found is None or isinstance(found, EvalTransform):
        return found
    return EvalTransform(found)


def tta_defaults() -> dict[str, Any]:
    """``{key: default}`` of every entry's keys, in registration order: the ``tta`` config section.

    Raises:
      ValueError: two entries declare one key with different defaults (a programming error).
    """
    keys: dict[str, Any] = {}
    for name in EVAL_TRANSFORMS:
        for key, default in entry(name).keys.items():
            if key in keys and keys[key] != default:
                raise ValueError(f"key 'tta.{key}' of train.eval_transform='{name}' clashes with another "
                                 "entry's default")
            keys[key] = default
    return keys


def from_config(config: Any) -> EvalTransformFn | None:
    """The eval transform of a run's config, bound to its ``tta`` keys; None when off.

    Reads ``train.eval_transform`` and the ``tta`` section; absent (a run saved before they
    existed) = '' (off) and the keys' defaults.

    Raises:
      ConfigError: an unknown name.
    """
    train = config.get("train") or {}
    chosen = entry(train.get("eval_transform", ""))
    return None if chosen is None else chosen.bind(config.get("tta"))


def _mean_softmax(log_probs_sum: jax.Array, views: int) -> jax.Array:
    return log_probs_sum - jnp.log(jnp.float32(views))


@EVAL_TRANSFORMS.register("horizontal_flip_tta")
def horizontal_flip_tta(apply_logits: ApplyLogits, images: jax.Array) -> jax.Array:
    """Test-time augmentation over the image and its mirror (columns reversed).

    Returns ``log((softmax(a) + softmax(b)) / 2)``, float32[B, C], with a, b the logits of the
    two views: log-probabilities whose softmax is the mean of the two softmaxes (computed as a
    logsumexp of the two log-softmaxes, so a probability that underflows stays finite). The
    cross-entropy of the eval step is then that of the mean probabilities.
    """
    a = jax.nn.log_softmax(apply_logits(images).astype(jnp.float32), axis=-1)
    b = jax.nn.log_softmax(apply_logits(images[:, :, ::-1]).astype(jnp.float32), axis=-1)
    return _mean_softmax(jnp.logaddexp(a, b), 2)


def shift_views(shift_pixels: int) -> tuple[tuple[bool, int, int], ...]:
    """The 10 views of :func:`flip_shift_tta`: (mirrored, row shift, column shift), in the order they run."""
    s = shift_pixels
    shifts = ((0, 0), (s, 0), (-s, 0), (0, s), (0, -s))
    return tuple((flip, dy, dx) for flip in (False, True) for dy, dx in shifts)


def flip_shift_tta(apply_logits: ApplyLogits, images: jax.Array, *, shift_pixels: int) -> jax.Array:
    """Test-time augmentation over 10 views: {image, mirror} x {no shift, +-s rows, +-s columns}.

    With s = `shift_pixels` and P the batch reflect-padded by s on each side of rows and
    columns (``jnp.pad(mode='reflect')``, numpy's: the edge pixel is not repeated), the view
    shifted by (dy, dx) is ``P[:, s - dy : s - dy + H, s - dx : s - dx + W]`` (content moved dy
    rows down and dx columns right), for (dy, dx) in (0, 0), (s, 0), (-s, 0), (0, s), (0, -s);
    each then also mirrored (columns reversed) (:func:`shift_views`). Returns
    ``log(mean over the 10 views of softmax(logits))``, float32[B, C] (a logsumexp of the
    log-softmaxes, as :func:`horizontal_flip_tta`). The views run one after another in a
    ``lax.scan`` (the model is compiled once; memory of one view at a time). Cost: 10 forward
    passes per image.
    """
    s = int(shift_pixels)
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode="reflect")
    views = shift_views(s)
    flips = jnp.asarray([v[0] for v in views])
    tops = jnp.asarray([s - v[1] for v in views], jnp.int32)
    lefts = jnp.asarray([s - v[2] for v in views], jnp.int32)

    def one_view(total, view):
        flip, top, left = view
        image = jax.lax.dynamic_slice(padded, (0, top, left, 0), (batch, height, width, channels))
        image = jnp.where(flip, image[:, :, ::-1], image)
        log_probs = jax.nn.log_softmax(apply_logits(image).astype(jnp.float32), axis=-1)
        return jnp.logaddexp(total, log_probs), None

    probe = jax.eval_shape(apply_logits, images)
    start = jnp.full(probe.shape, -jnp.inf, jnp.float32)
    total, _ = jax.lax.scan(one_view, start, (flips, tops, lefts))
    return _mean_softmax(total, len(views))


EVAL_TRANSFORMS.register("flip_shift_tta", EvalTransform(
    flip_shift_tta, keys={"shift_pixels": 2},
    checks={"shift_pixels": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                             "an int >= 1 pixels")}))
